"""Load DeepSeek-V3/R1 weights in the HF / DeepSeek release layout (safetensors) into `Params`.

One table maps checkpoint names to ours; every tensor is checked for presence and shape against the declaration
(`param_infos`) before anything is assembled, and the error names each missing or misshapen tensor. FP8 release
weights (`*.weight_scale_inv`, 128x128 blocks, partial edge blocks) are dequantised with ceil-divided blocks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from model.config import Config
from model.params import Attention, Layer, Mlp, Moe, Mtp, Params, is_info, param_infos


class CheckpointError(ValueError):
    """A checkpoint that does not match the configuration: missing, misshapen or unexpected tensors."""


def dequant_fp8_blocks(w: np.ndarray, scale_inv: np.ndarray, block: int = 128) -> np.ndarray:
    """W[i, j] = q[i, j] * scale_inv[i // 128, j // 128]; the grid is ceil(out/128) x ceil(in/128)."""
    rows, cols = w.shape
    want = (math.ceil(rows / block), math.ceil(cols / block))
    if scale_inv.shape != want:
        raise CheckpointError(f"FP8 scale grid {scale_inv.shape} does not fit weight {w.shape}: expected {want}")
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)[:rows, :cols]
    return w.astype(np.float32) * s


# Each entry: our field -> (checkpoint suffix, transform from the checkpoint array to our layout).
def _t(a):
    return a.T


def _attention_map(cfg: Config) -> dict[str, tuple[str, Callable]]:
    n, h, v, q, c = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.q_lora_rank,
                     cfg.kv_lora_rank)

    def kv_b(part):
        def f(a):  # [N*(H+V), C] -> [N, H, C] or [N, C, V]
            a = a.reshape(n, h + v, c)
            return a[:, :h] if part == "k" else a[:, h:].transpose(0, 2, 1)
        return f

    return {
        "wq_a": ("self_attn.q_a_proj.weight", _t),
        "q_norm": ("self_attn.q_a_layernorm.weight", None),
        "wq_b": ("self_attn.q_b_proj.weight", lambda a: a.T.reshape(q, n, -1)),
        "wkv_a": ("self_attn.kv_a_proj_with_mqa.weight", _t),
        "kv_norm": ("self_attn.kv_a_layernorm.weight", None),
        "wk_b": ("self_attn.kv_b_proj.weight", kv_b("k")),
        "wv_b": ("self_attn.kv_b_proj.weight", kv_b("v")),
        "wo": ("self_attn.o_proj.weight", lambda a: a.T.reshape(n, v, -1)),
    }


_MLP = {"w1": "gate_proj.weight", "w3": "up_proj.weight", "w2": "down_proj.weight"}


class _Reader:
    """Reads tensors by name (dequantising FP8 ones) into our layout, recording what is missing, misshapen or
    unused, with the checkpoint's own tensor names in every message."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors = tensors
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.misshapen: list[str] = []

    def get(self, name: str, info, fn: Callable | None = None) -> np.ndarray | None:
        if name not in self.tensors:
            self.missing.append(name)
            return None
        self.used.add(name)
        a = np.asarray(self.tensors[name])
        if name + "_scale_inv" in self.tensors:
            self.used.add(name + "_scale_inv")
            a = dequant_fp8_blocks(a, np.asarray(self.tensors[name + "_scale_inv"]))
        raw_shape = a.shape
        try:
            a = fn(a) if fn else a
        except ValueError:
            a = None
        if a is None or tuple(a.shape) != info.shape:
            self.misshapen.append(f"{name} has shape {tuple(raw_shape)}, which does not give the config's "
                                  f"{info.shape} [{', '.join(str(x) for x in info.logical_axes)}]")
            return None
        return a


def _layer_arrays(r: _Reader, prefix: str, cfg: Config, info: Layer) -> dict:
    out: dict = {"attn_norm": r.get(prefix + "input_layernorm.weight", info.attn_norm),
                 "ffn_norm": r.get(prefix + "post_attention_layernorm.weight", info.ffn_norm), "attn": {}}
    for field, (suffix, fn) in _attention_map(cfg).items():
        out["attn"][field] = r.get(prefix + suffix, getattr(info.attn, field), fn)
    f = info.ffn
    if not isinstance(f, Moe):
        out["ffn"] = {k: r.get(prefix + "mlp." + s, getattr(f, k), _t) for k, s in _MLP.items()}
        return out
    ffn = {"w_router": r.get(prefix + "mlp.gate.weight", f.w_router, _t),
           "e_bias": r.get(prefix + "mlp.gate.e_score_correction_bias", f.e_bias),
           "shared": {k: r.get(prefix + "mlp.shared_experts." + s, getattr(f.shared, k), _t) for k, s in _MLP.items()}}
    for k, s in _MLP.items():
        one = _drop_lead(getattr(f, "we" + k[1]))
        per = [r.get(f"{prefix}mlp.experts.{e}.{s}", one, _t) for e in range(cfg.n_routed_experts)]
        ffn["we" + k[1]] = None if any(p is None for p in per) else np.stack(per)
    out["ffn"] = ffn
    return out


def _drop_lead(info):
    return dataclasses.replace(info, shape=info.shape[1:], logical_axes=info.logical_axes[1:])


def _unstack(tree):
    return jax.tree.map(_drop_lead, tree, is_leaf=is_info)


def _build_layer(d: dict, moe: bool) -> Layer:
    attn = Attention(**d["attn"])
    ffn = Moe(**{**d["ffn"], "shared": Mlp(**d["ffn"]["shared"])}) if moe else Mlp(**d["ffn"])
    return Layer(attn_norm=d["attn_norm"], attn=attn, ffn_norm=d["ffn_norm"], ffn=ffn)


def _stack_layers(layers: list[Layer]) -> Layer:
    return jax.tree.map(lambda *xs: None if any(x is None for x in xs) else np.stack(xs), *layers,
                        is_leaf=lambda x: x is None)


def params_from_tensors(tensors: Mapping[str, np.ndarray], cfg: Config, *, with_mtp: bool = False,
                        strict: bool = True) -> Params:
    """Map a flat {checkpoint name: array} dict onto `Params`, checking every tensor against the config.

    Raises CheckpointError naming each missing tensor, each shape that disagrees with the config, and (strict)
    every tensor the config has no place for.
    """
    r = _Reader(tensors)
    infos = param_infos(cfg, with_mtp=with_mtp)
    n_dense = cfg.first_k_dense_replace
    dense = [_build_layer(_layer_arrays(r, f"model.layers.{i}.", cfg, _unstack(infos.dense_layers)), False)
             for i in range(n_dense)]
    moe = [_build_layer(_layer_arrays(r, f"model.layers.{i}.", cfg, _unstack(infos.moe_layers)), True)
           for i in range(n_dense, cfg.num_hidden_layers)]
    mtp = None
    if with_mtp:
        pre, m = f"model.layers.{cfg.num_hidden_layers}.", infos.mtp
        mtp = Mtp(enorm=r.get(pre + "enorm.weight", m.enorm), hnorm=r.get(pre + "hnorm.weight", m.hnorm),
                  eh_proj=r.get(pre + "eh_proj.weight", m.eh_proj, _t),
                  layer=_build_layer(_layer_arrays(r, pre, cfg, m.layer), True),
                  norm=r.get(pre + "shared_head.norm.weight", m.norm))
    params = Params(embed=r.get("model.embed_tokens.weight", infos.embed),
                    dense_layers=_stack_layers(dense) if dense else None,
                    moe_layers=_stack_layers(moe) if moe else None,
                    norm=r.get("model.norm.weight", infos.norm), lm_head=r.get("lm_head.weight", infos.lm_head, _t),
                    mtp=mtp)
    problems = []
    for kind, items in (("missing", r.missing), ("misshapen", r.misshapen)):
        if items:
            problems.append(f"{len(items)} {kind} tensor(s): " + "; ".join(items[:10])
                            + (" ..." if len(items) > 10 else ""))
    if strict:
        mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
        extra = sorted(k for k in tensors if k not in r.used and not (not with_mtp and k.startswith(mtp_prefix)))
        if extra:
            problems.append(f"{len(extra)} unexpected tensor(s): " + ", ".join(extra[:10]))
    if problems:
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(problems))
    return jax.tree.map(lambda a, i: None if a is None else jnp.asarray(a, i.dtype), params, infos,
                        is_leaf=lambda x: x is None)


def load_hf_checkpoint(path: str | Path, cfg: Config | None = None, **kw) -> tuple[Params, Config]:
    """Load a directory holding config.json and *.safetensors (one or many shards)."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if cfg is None:
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json; pass cfg= explicitly")
        cfg = Config.from_dict(json.loads((path / "config.json").read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(f))
    return params_from_tensors(tensors, cfg, **kw), cfg
