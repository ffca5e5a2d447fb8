"""Checkpoints in exactly the layout of DeepSeek's FP8 release, written from parameters: for tests, fixtures and
benchmarks of the loaders (`scripts/make_release_fixture.py`).

The layout (the DeepSeek-V3 / R1 release): `config.json` with its `quantization_config`; tensors in several
`model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`; every linear of attention, the MLPs
and the experts (MTP layer included) in `float8_e4m3fn` [out, in] with a float32 `weight_scale_inv` per 128x128
block (partial edge blocks where a dimension is not a multiple of 128); the embedding, the LM head, the norms, the
router and `eh_proj` in BF16, the router's correction bias in float32; the MTP layer at index num_hidden_layers,
with its own copies of the embedding and the head.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from model.config import Config
from model.io.hf_checkpoint import hf_tensors
from model.io.safetensors import INDEX, write_safetensors
from model.io.tokenizer import DESCRIPTION_FILE
from model.params import Params, abstract_params
from quant.formats import fp8_quantize_2d

BF16_KEPT = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight", "mlp.gate.weight",
             "eh_proj.weight")


_fp8_2d = jax.jit(fp8_quantize_2d)  # one program per shape, not one per operation


def release_config(cfg: Config) -> dict:
    """config.json as the release writes it."""
    d = cfg.to_dict()
    rs = d.pop("rope_scaling")
    d.pop("dtype")
    d.update(torch_dtype="bfloat16", architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
             rope_scaling=rs, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                                                    "quant_method": "fp8", "weight_block_size": [128, 128]})
    return d


def release_tensors(params: Params, cfg: Config) -> dict[str, np.ndarray]:
    """{name: array} of the release: FP8 linears with their scales, BF16 (and the float32 router bias) else."""
    out = {}
    for name, a in hf_tensors(params, cfg).items():
        out.update(_release_layout(name, a))
    return out


def _release_layout(name: str, a) -> dict[str, np.ndarray]:
    """One tensor as the release stores it: an FP8 linear with its scales, BF16, or the float32 router bias."""
    if a.ndim == 2 and not name.endswith(BF16_KEPT):
        codes, scale = _fp8_2d(jnp.asarray(a, jnp.float32))
        return {name: np.asarray(codes), name + "_scale_inv": np.asarray(scale, np.float32)}
    if name.endswith("e_score_correction_bias"):
        return {name: np.asarray(a, np.float32)}
    return {name: np.asarray(a, ml_dtypes.bfloat16)}


def _layer_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3]) if name.startswith("model.layers.") else "globals"


def write_random_release(path: str | Path, cfg: Config, *, seed: int = 0) -> dict:
    """A release-layout checkpoint of random weights (normal, std 1/sqrt(fan-in); unit norms, zero router bias) of
    any size, written tensor by tensor, one shard per layer as the release has them: host memory stays at one
    layer whatever the model's size. Returns {"tensors": count, "bytes": total, "shards": count}."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=False)
    # the names and shapes in the release's layout, from stand-ins that hold no memory
    stand_in = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape),
                            abstract_params(cfg, with_mtp=cfg.num_nextn_predict_layers > 0))
    shapes = {k: v.shape for k, v in hf_tensors(stand_in, cfg).items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(_layer_of(name), []).append(name)
    rng = np.random.default_rng(seed)
    weight_map, total, count = {}, 0, 0
    for i, names in enumerate(groups.values()):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {}
        for name in names:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                a = np.ones(shape, np.float32)
            elif name.endswith("e_score_correction_bias"):
                a = np.zeros(shape, np.float32)
            else:  # [out, in] linears, the embedding [V, D] rows
                fan_in = 1 if "embed_tokens" in name else shape[-1]
                a = rng.standard_normal(shape, np.float32) * np.float32(fan_in ** -0.5)
            part.update(_release_layout(name, a))
        write_safetensors(path / file, part, {"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(a.nbytes for a in part.values())
        count += len(part)
        del part
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(release_config(cfg), indent=2) + "\n")
    return {"tensors": count, "bytes": total, "shards": len(groups)}


def write_release(path: str | Path, params: Params, cfg: Config, *, shards: int = 3,
                  tokenizer: dict | None = None) -> dict[str, np.ndarray]:
    """Write the release layout of `params` (plain float arrays) into a new directory `path`; returns the tensors
    written, by name. Layers are spread over `shards` files in order, as the release's are. tokenizer: the
    description of the model's tokenizer (its describe()), written beside the tensors for the loaders to find."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=False)
    tensors = release_tensors(params, cfg)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i * per:(i + 1) * per]}
        write_safetensors(path / file, part, {"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(a.nbytes for a in tensors.values())
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(release_config(cfg), indent=2) + "\n")
    if tokenizer is not None:
        (path / DESCRIPTION_FILE).write_text(json.dumps(tokenizer, indent=2) + "\n")
    return tensors
