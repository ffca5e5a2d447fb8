"""Converting the release layout into the layered checkpoint, and restoring it: the FP8 codes kept bit for bit, a
re-quantization equal to the recipe, a conversion killed half-way that resumes to the same result, an output never
overwritten or taken for finished before it is, and restores onto meshes other than the one saved from."""

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import quantize_params
from model.cli import generate_main, load_any
from model.config import RELEASE_TINY
from model.io.checkpoint import load_checkpoint
from model.io.convert import convert
from model.io.errors import CheckpointError
from model.io.hf_checkpoint import load_hf_checkpoint
from model.io.layered import save_layered
from model.placement import shard_params
from model.quantize import dequantize_all, with_compute_dtype
from quant.qarray import dequantize
from sharding.mesh import make_mesh

ROOT = Path(__file__).resolve().parents[1]
CFG = RELEASE_TINY


def same(a, b) -> bool:
    """Identical trees: structure, QArray fields, dtypes and every bit."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(x.dtype == y.dtype and x.shape == y.shape
               and np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def direct(release):
    return load_hf_checkpoint(release[0], dtype="float32")[0]


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    log = io.StringIO()
    dst = convert(release[0], tmp_path_factory.mktemp("converted") / "fp8", dtype="float32", progress_stream=log)
    return dst, log.getvalue()


def test_conversion_keeps_the_release_bit_for_bit(release, direct, converted):
    dst, log = converted
    params, cfg, meta = load_checkpoint(dst)
    assert cfg == CFG and meta["format"] == 2 and meta["recipes"] == ["fp8_w8a8"]
    assert same(params, direct)   # which test_release.py shows is the release's own codes and scales
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert np.asarray(params.moe_layers.ffn.we2.codes[0, 3]).view(np.uint8).tobytes() == release[1][name].tobytes()
    assert sorted(p.name for p in (dst / "params").iterdir()) == ["dense_layers.000", "globals", "moe_layers.000",
                                                                  "mtp"]
    assert not (dst / "progress.json").exists() and not dst.with_name(dst.name + ".partial").exists()
    n = len(release[1])
    assert f"tensors {n}/{n}" in log.splitlines()[-1] and "100.0%" in log


def test_requantized_conversion_is_the_recipe(release, direct, tmp_path):
    # the experts re-quantized 3 at a time (3 + 1 of 4): the same stack as quantizing all at once
    dst = convert(release[0], tmp_path / "fp4", dtype="float32", weights="r1_fp4", expert_chunk=3,
                  progress_stream=io.StringIO())
    params, _, meta = load_checkpoint(dst)
    assert meta["recipes"] == ["fp8_w8a8", "r1_fp4"] and params.moe_layers.ffn.we1.fmt == "nvfp4"
    assert same(params, quantize_params(direct, CFG, "r1_fp4"))


def test_an_existing_output_is_kept(release, converted):
    dst, _ = converted
    before = {p: p.stat().st_mtime_ns for p in dst.rglob("*")}
    with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
        convert(release[0], dst, dtype="float32")
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*")} == before


def test_a_killed_conversion_resumes_to_the_same_result(release, converted, tmp_path):
    dst = tmp_path / "resumed"
    part = tmp_path / "resumed.partial"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "convert.py"), str(release[0]), str(dst),
                             "--dtype", "float32"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = []
    while proc.poll() is None and len(done) < 1:
        try:
            done = list(json.loads((part / "progress.json").read_text())["done"])
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert done and not dst.exists(), "the conversion finished before it could be killed"
    with pytest.raises(CheckpointError, match="unfinished conversion"):
        load_checkpoint(part)
    first = part / "params" / done[0]
    stamp = first.stat().st_mtime_ns
    with pytest.raises(CheckpointError, match="another source or with other options"):
        convert(release[0], dst, dtype="bfloat16")
    log = io.StringIO()
    convert(release[0], dst, dtype="float32", progress_stream=log)
    assert (dst / "params" / done[0]).stat().st_mtime_ns == stamp   # the finished item was not written again
    assert len(log.getvalue().splitlines()) == 4 - len(done)
    assert same(load_checkpoint(dst)[0], load_checkpoint(converted[0])[0])


def _check_placed(got, want, mesh):
    """got holds want's values, placed where shard_params puts them on mesh (and sharded, not replicated)."""
    assert same(got, want)
    where = jax.tree.leaves(shard_params(want, CFG, mesh))
    assert all(x.sharding.is_equivalent_to(w.sharding, x.ndim) for x, w in zip(jax.tree.leaves(got), where))
    assert {d.id for x in jax.tree.leaves(got) for d in x.sharding.device_set} == {d.id for d in mesh.devices.flat}
    assert sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(got)) > 10


def test_restore_onto_meshes(direct, converted, tmp_path):
    # the converted FP8 release (saved from the host) onto 8 devices, experts split
    mesh = make_mesh("data=2,expert=4")
    params, _, tok = load_any(converted[0], mesh=mesh)   # as the command line loads it
    _check_placed(params, direct, mesh)
    assert tok.describe()["kind"] == "bytes"
    # saved from 8 devices with the experts split, restored onto 4 with the heads and the FFN split
    plain = dequantize_all(direct)
    dst = save_layered(tmp_path / "c", shard_params(plain, CFG, make_mesh("data=2,expert=4")), CFG)
    mesh = make_mesh("expert=2,tensor=2", devices=jax.devices()[:4])
    _check_placed(load_checkpoint(dst, mesh=mesh)[0], plain, mesh)


def test_a_checkpoint_that_disagrees_with_its_config_is_named(converted, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(converted[0], dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["config"]["moe_intermediate_size"] = 64
    (dst / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"hash mismatch in meta.json"):
        load_checkpoint(dst)
    with pytest.raises(CheckpointError, match=r"\.moe_layers\.ffn\.we1 is quantized as \(1, 4, 256, 192\), the "
                                              r"config declares \(1, 4, 256, 64\)"):
        load_checkpoint(dst, verify=False)
    # a plain array that does not fit: the saved arrays are checked against the config before any is read
    meta["config"]["moe_intermediate_size"] = 192
    meta["config"]["hidden_size"] = 128
    meta["quantized"] = {}
    (dst / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"globals: embed saved \(512, 256\) float32, expected \(512, 128\)"):
        load_checkpoint(dst, verify=False)


def test_another_compute_dtype(converted):
    """--dtype on a converted checkpoint: plain weights cast, FP8 codes and scales kept, dequantized to the new
    dtype; the router's correction bias stays float32 as declared."""
    params, cfg, _ = load_checkpoint(converted[0])
    bf16, cfg16 = with_compute_dtype(params, cfg, "bfloat16")
    assert cfg16.dtype == "bfloat16" and bf16.embed.dtype == jnp.bfloat16
    assert bf16.moe_layers.ffn.e_bias.dtype == jnp.float32
    we1, we1_16 = params.moe_layers.ffn.we1, bf16.moe_layers.ffn.we1
    assert we1_16.codes is we1.codes and we1_16.scales is we1.scales and we1_16.dtype == "bfloat16"
    assert dequantize(we1_16).dtype == jnp.bfloat16


def test_command_lines_name_the_problem_in_one_line(release, converted, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_script", ROOT / "scripts" / "convert.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cases = [(script.main, [str(tmp_path / "none"), str(tmp_path / "out")], "convert: error: checkpoint directory"),
             (script.main, [str(release[0]), str(converted[0])], "exists; pass --overwrite to replace it"),
             (generate_main, ["--checkpoint", str(converted[0]), "--mesh", "expert=3"], "r1jax-generate: error:")]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
