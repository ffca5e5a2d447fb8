"""Checkpoints of this project: orbax-checkpoint arrays plus a JSON sidecar (config, tokenizer, training
metadata) and a manifest of SHA-256 hashes, verified on load.

Two formats. Format 1 (this module's save_checkpoint; the bundled model): DIR/params/ (one orbax item),
DIR/meta.json, DIR/manifest.json. Format 2 (model/io/layered.py; conversions of the release): one orbax item per
layer, restored straight onto a mesh. `load_checkpoint` reads both, and places either on a mesh when given one.
Saving writes to DIR.tmp-* and renames, so an existing checkpoint is never half-overwritten; an existing DIR is
refused unless overwrite=True. Loading checks,
in order: the directory, the sidecar, the hashes, then every tensor's shape and dtype against the config, each
with a message that names the problem, before any array is read.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from model.config import Config
from model.io import layered
from model.io.errors import CheckpointError, require_directory
from model.params import Params, abstract_params
from model.placement import shard_params
from quant.qarray import dequantize, is_qarray
from sharding.rules import ShardingRules

FORMAT = 1


def save_checkpoint(path: str | Path, params: Params, cfg: Config, *, tokenizer: dict | None = None,
                    training: dict | None = None, overwrite: bool = False) -> Path:
    path = Path(path).resolve()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tmp = path.parent / f"{path.name}.tmp-{time.time_ns()}"
    tmp.mkdir(parents=True)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        meta = {"format": FORMAT, "config": cfg.to_dict(), "tokenizer": tokenizer, "training": training,
                "with_mtp": params.mtp is not None}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=float) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(layered.hash_files(tmp), indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    require_directory(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file() and (path / "progress.json").is_file():
        raise CheckpointError(f"{path} is an unfinished conversion: run the same scripts/convert.py command again to "
                              f"finish it")
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint of this project: meta.json is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is corrupted: {e}") from None
    if meta.get("format") not in (FORMAT, layered.FORMAT):
        raise CheckpointError(f"{meta_file}: unsupported checkpoint format {meta.get('format')!r}")
    return meta


def verify_manifest(path: Path) -> None:
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise CheckpointError(f"{path}: manifest.json is missing (incomplete or foreign checkpoint)")
    want = json.loads(manifest_file.read_text())
    have = layered.hash_files(path)
    missing = sorted(set(want) - set(have))
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing file(s): {', '.join(missing[:5])}")
    bad = sorted(k for k in want if have[k] != want[k])
    if bad:
        raise CheckpointError(f"{path}: corrupted checkpoint, hash mismatch in {', '.join(bad[:5])}")


def _path_name(keys) -> str:
    """'.moe_layers.ffn.we1' whether the path is of dataclass attributes (ours) or dict keys (orbax metadata)."""
    parts = []
    for k in keys:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "." + ".".join(parts)


def _saved_tree(path: Path):
    """The saved tree's structure with each array's metadata (shape, dtype), nothing read."""
    try:
        meta = ocp.StandardCheckpointer().metadata(path / "params")
    except Exception as e:  # orbax raises many kinds; we say which file and why
        raise CheckpointError(f"{path / 'params'}: unreadable orbax checkpoint ({type(e).__name__}: {e})") from None
    return getattr(meta, "item_metadata", meta)


def _check_shapes(path: Path, target: Params, saved) -> None:
    saved_flat = {_path_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(
        saved, is_leaf=lambda x: hasattr(x, "shape"))[0]}
    problems = []
    for k, want in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = _path_name(k)
        got = saved_flat.get(name)
        if got is None:
            problems.append(f"{name} missing")
        elif tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            problems.append(f"{name}: saved {tuple(got.shape)} {np.dtype(got.dtype)}, the config needs "
                            f"{tuple(want.shape)} {np.dtype(want.dtype)}")
    extra = sorted(set(saved_flat) - {_path_name(k) for k, _ in jax.tree_util.tree_flatten_with_path(target)[0]})
    if extra:
        problems.append(f"unexpected tensors {', '.join(extra[:5])}")
    if problems:
        raise CheckpointError(f"{path}: the tensors do not fit the config in meta.json: " + "; ".join(problems[:8]))


def load_checkpoint(path: str | Path, *, verify: bool = True, mesh=None, rules: ShardingRules = ShardingRules(),
                    check_finite: bool | None = None) -> tuple[Params, Config, dict]:
    """Returns (params, config, meta), on one device or, with a mesh, placed on it by the sharding rules (format 2
    restores each device's part directly). verify: check the manifest's hashes first (reads every file once).
    check_finite: refuse a weight holding NaN or inf, naming it (default: on below FINITE_CHECK_BYTES of weights).
    Raises CheckpointError with a specific message on any mismatch."""
    path = Path(path).resolve()  # orbax reads metadata of relative paths as empty
    meta = read_meta(path)
    try:
        cfg = Config.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/meta.json: invalid config ({e})") from None
    if verify:
        verify_manifest(path)
    if meta["format"] == layered.FORMAT:
        params = layered.restore(path, cfg, meta, mesh=mesh, rules=rules)
    else:
        params = _load_format1(path, cfg, meta)
        params = params if mesh is None else shard_params(params, cfg, mesh, rules)
    if check_finite is None:
        check_finite = sum(x.nbytes for x in jax.tree.leaves(params)) < FINITE_CHECK_BYTES
    if check_finite:
        bad = first_nonfinite(params)
        if bad is not None:
            raise CheckpointError(f"{path}: weight {bad} holds NaN or inf (load with check_finite=False to "
                                  f"look at it)")
    return params, cfg, meta


FINITE_CHECK_BYTES = 2e9  # the check reads every weight once: on by default where that is cheap


def first_nonfinite(params) -> str | None:
    """The path of the first weight holding NaN or inf (a quantized one through its dequantized values)."""
    for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]:
        v = dequantize(x, jnp.float32) if is_qarray(x) else x
        if jnp.issubdtype(v.dtype, jnp.floating) and not bool(jnp.isfinite(v).all()):
            return jax.tree_util.keystr(p)
    return None


def _load_format1(path: Path, cfg: Config, meta: dict) -> Params:
    target = abstract_params(cfg, with_mtp=meta.get("with_mtp", False))
    saved = _saved_tree(path)
    _check_shapes(path, target, saved)
    # restored in the saved structure and matched to ours by path: what is not a parameter (None fields) may
    # differ between the two without breaking older checkpoints
    restored = ocp.StandardCheckpointer().restore(path / "params", jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved, is_leaf=lambda x: hasattr(x, "shape")))
    by_name = {_path_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
    return jax.tree_util.tree_map_with_path(lambda k, _: jnp.asarray(by_name[_path_name(k)]), target)
