"""Parameter pytrees, declared once as `ArrayInfo(shape, dtype, logical_axes, init)`.

`param_infos(cfg)` is the single declaration; `init`, `abstract_params` (no allocation), the parameter counts, the
sharding rules and the checkpoint loaders all derive from it. Layers are stacked on a leading `layers` axis: the
dense-first layers form one stack, the MoE layers another, and each stack runs under `jax.lax.scan`.

Layouts (letters from `model/__init__.py`): linear weights are stored [in, out] so einsums read left to right
(the unstacked CPU layout, model/layout.py, stores plain MLPs and the LM head output-major instead);
`wk_b` [N, H, C] / `wv_b` [N, C, V] are DeepSeek's `wkv_b` split per head into its key and value halves, heads
leading, which is what the absorbed decode form needs without a per-step slice or transpose.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from model.config import Config

Array = jax.Array


_BATCH_AXES = ("layers", "experts")


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """Declaration of one parameter: shape, dtype, one logical axis name per dimension, and its initialiser."""

    shape: tuple[int, ...]
    dtype: Any
    logical_axes: tuple[str | None, ...]
    init: str = "normal"  # "normal" (std = initializer_range), "ones" or "zeros"
    fan_in_axes: tuple[str, ...] | None = None  # the matmul's input axes; default: the first non-batch axis

    def __post_init__(self):
        if len(self.shape) != len(self.logical_axes):
            raise ValueError(f"ArrayInfo: shape {self.shape} has {len(self.shape)} dims but logical axes "
                             f"{self.logical_axes} name {len(self.logical_axes)}")

    @property
    def fan_in(self) -> int:
        if self.fan_in_axes is not None:
            return math.prod(n for n, a in zip(self.shape, self.logical_axes) if a in self.fan_in_axes)
        return next(n for n, a in zip(self.shape, self.logical_axes) if a not in _BATCH_AXES)

    def stacked(self, n: int) -> ArrayInfo:
        return dataclasses.replace(self, shape=(n, *self.shape), logical_axes=("layers", *self.logical_axes))


def is_info(x) -> bool:
    return isinstance(x, ArrayInfo)


@struct.dataclass
class Attention:
    wq_a: Array  # [D, Q]
    q_norm: Array  # [Q]
    wq_b: Array  # [Q, N, H+R]
    wkv_a: Array  # [D, C+R]
    kv_norm: Array  # [C]
    wk_b: Array  # [N, H, C]  key half of wkv_b (absorbed into the query at decode)
    wv_b: Array  # [N, C, V]  value half of wkv_b (absorbed into the output at decode)
    wo: Array  # [N, V, D]


@struct.dataclass
class Mlp:
    w1: Array  # [D, F] gate_proj
    w3: Array  # [D, F] up_proj
    w2: Array  # [F, D] down_proj


@struct.dataclass
class Moe:
    w_router: Array  # [D, E]
    e_bias: Array  # [E] e_score_correction_bias, float32, used for selection only
    we1: Array  # [E, D, M]
    we3: Array  # [E, D, M]
    we2: Array  # [E, M, D]
    shared: Mlp  # width M * n_shared_experts


@struct.dataclass
class OutMajorMlp:
    """A plain SwiGLU MLP as the unstacked layout stores it (model/layout.py), output axis first so that a one-row
    product runs as W @ x with the weight as the left operand: gate and up as one [2, F, D] matrix (gate first),
    the down projection as [D, F]. Same function as `Mlp(w1=w13[0].T, w3=w13[1].T, w2=w2t.T)`."""

    w13: Array  # [2, F, D]
    w2t: Array  # [D, F]


@struct.dataclass
class Transposed:
    """A plain [in, out] weight stored as its transpose t [out, in] (the unstacked layout's LM head)."""

    t: Array


@struct.dataclass
class Layer:
    attn_norm: Array  # [D]
    attn: Attention
    ffn_norm: Array  # [D]
    ffn: Mlp | Moe | OutMajorMlp


@struct.dataclass
class Mtp:
    """Multi-token-prediction module (depth 1); embedding and LM head are shared with the main model."""

    enorm: Array  # [D]
    hnorm: Array  # [D]
    eh_proj: Array  # [2D, D]  input = [enorm(emb) ; hnorm(h)], embedding first
    layer: Layer  # one MoE decoder layer (not stacked)
    norm: Array  # [D] shared_head.norm


@struct.dataclass
class Params:
    embed: Array  # [V, D]
    dense_layers: Layer | None  # stacked [Ld, ...], Ld = first_k_dense_replace
    moe_layers: Layer | None  # stacked [Lm, ...]
    norm: Array  # [D]
    lm_head: Array  # [D, V]
    mtp: Mtp | None = None


# ---- declarations -----------------------------------------------------------------------------------------------

def _attention_infos(cfg: Config) -> Attention:
    d, q, c, r = cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    n, h, v, dt = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.param_dtype
    return Attention(
        wq_a=ArrayInfo((d, q), dt, ("embed", "q_lora")),
        q_norm=ArrayInfo((q,), dt, ("q_lora",), "ones"),
        wq_b=ArrayInfo((q, n, h + r), dt, ("q_lora", "heads", "qk_head")),
        wkv_a=ArrayInfo((d, c + r), dt, ("embed", "kv_lora_rope")),
        kv_norm=ArrayInfo((c,), dt, ("kv_lora",), "ones"),
        # heads lead in wk_b / wv_b: the absorbed einsums batch over heads, and XLA wants batch dims leading
        wk_b=ArrayInfo((n, h, c), dt, ("heads", "qk_nope", "kv_lora"), fan_in_axes=("kv_lora",)),
        wv_b=ArrayInfo((n, c, v), dt, ("heads", "kv_lora", "v_head"), fan_in_axes=("kv_lora",)),
        wo=ArrayInfo((n, v, d), dt, ("heads", "v_head", "embed"), fan_in_axes=("heads", "v_head")),
    )


def _mlp_infos(d: int, f: int, dt, axis: str = "ffn") -> Mlp:
    return Mlp(w1=ArrayInfo((d, f), dt, ("embed", axis)), w3=ArrayInfo((d, f), dt, ("embed", axis)),
               w2=ArrayInfo((f, d), dt, (axis, "embed")))


def _moe_infos(cfg: Config) -> Moe:
    d, e, m, dt = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.param_dtype
    return Moe(
        w_router=ArrayInfo((d, e), dt, ("embed", "experts_router")),
        e_bias=ArrayInfo((e,), jnp.float32, ("experts_router",), "zeros"),
        we1=ArrayInfo((e, d, m), dt, ("experts", "embed", "expert_ffn")),
        we3=ArrayInfo((e, d, m), dt, ("experts", "embed", "expert_ffn")),
        we2=ArrayInfo((e, m, d), dt, ("experts", "expert_ffn", "embed")),
        shared=_mlp_infos(d, m * cfg.n_shared_experts, dt, "shared_ffn"),
    )


def _layer_infos(cfg: Config, moe: bool) -> Layer:
    d, dt = cfg.hidden_size, cfg.param_dtype
    ffn = _moe_infos(cfg) if moe else _mlp_infos(d, cfg.intermediate_size, dt)
    return Layer(attn_norm=ArrayInfo((d,), dt, ("embed",), "ones"), attn=_attention_infos(cfg),
                 ffn_norm=ArrayInfo((d,), dt, ("embed",), "ones"), ffn=ffn)


def _stack(tree, n: int):
    return jax.tree.map(lambda i: i.stacked(n), tree, is_leaf=is_info)


def param_infos(cfg: Config, *, with_mtp: bool | None = None) -> Params:
    """The declaration tree: a `Params` whose leaves are `ArrayInfo`s."""
    d, v, dt = cfg.hidden_size, cfg.vocab_size, cfg.param_dtype
    with_mtp = cfg.num_nextn_predict_layers > 0 if with_mtp is None else with_mtp
    n_dense, n_moe = cfg.first_k_dense_replace, cfg.n_moe_layers
    mtp = None
    if with_mtp:
        mtp = Mtp(enorm=ArrayInfo((d,), dt, ("embed",), "ones"), hnorm=ArrayInfo((d,), dt, ("embed",), "ones"),
                  eh_proj=ArrayInfo((2 * d, d), dt, ("embed_concat", "embed")), layer=_layer_infos(cfg, moe=True),
                  norm=ArrayInfo((d,), dt, ("embed",), "ones"))
    return Params(
        embed=ArrayInfo((v, d), dt, ("vocab", "embed")),
        dense_layers=_stack(_layer_infos(cfg, moe=False), n_dense) if n_dense else None,
        moe_layers=_stack(_layer_infos(cfg, moe=True), n_moe) if n_moe else None,
        norm=ArrayInfo((d,), dt, ("embed",), "ones"),
        lm_head=ArrayInfo((d, v), dt, ("embed", "vocab")),
        mtp=mtp,
    )


# ---- init and abstract shapes -------------------------------------------------------------------------------------

def _init_leaf(info: ArrayInfo, key, std: float | str):
    if info.init == "ones":
        return jnp.ones(info.shape, info.dtype)
    if info.init == "zeros":
        return jnp.zeros(info.shape, info.dtype)
    scale = info.fan_in ** -0.5 if std == "fan_in" else std
    return (scale * jax.random.normal(key, info.shape, jnp.float32)).astype(info.dtype)


def init(cfg: Config, key: Array, *, with_mtp: bool | None = None, std: float | str | None = None) -> Params:
    """Random parameters: normal matrices, unit norms, zero router bias.

    std: None for the config's initializer_range, a float, or "fan_in" for 1/sqrt(fan_in) (activations of order
    one through every layer: what random-weight tests and benchmarks want).
    """
    infos = param_infos(cfg, with_mtp=with_mtp)
    leaves, treedef = jax.tree.flatten(infos, is_leaf=is_info)
    keys = jax.random.split(key, len(leaves))
    std = cfg.initializer_range if std is None else std
    return jax.tree.unflatten(treedef, [_init_leaf(i, k, std) for i, k in zip(leaves, keys)])


def abstract_params(cfg: Config, *, with_mtp: bool | None = None) -> Params:
    """`jax.eval_shape` of `init`: ShapeDtypeStructs only, nothing allocated (works for the 671B on a laptop)."""
    return jax.eval_shape(lambda k: init(cfg, k, with_mtp=with_mtp), jax.random.key(0))


# ---- counts -------------------------------------------------------------------------------------------------------

def _size(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree, is_leaf=is_info))


def param_counts(cfg: Config) -> dict[str, int]:
    """Parameter counts by component, the main-model total, the MTP module, and the activated count per token.

    `activated` follows DeepSeek's convention: every non-expert parameter of the main model plus
    `num_experts_per_tok` routed experts per MoE layer (the embedding row lookup counted in full, as in the
    37B figure; `activated_matmul` leaves the embedding out).
    """
    infos = param_infos(cfg, with_mtp=cfg.num_nextn_predict_layers > 0)
    one_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    counts = {"embed": _size(infos.embed), "lm_head": _size(infos.lm_head), "final_norm": _size(infos.norm)}
    counts["attention"] = 0
    counts["dense_mlp"] = 0
    counts["routed_experts"] = counts["shared_experts"] = counts["router"] = 0
    for stack in (infos.dense_layers, infos.moe_layers):
        if stack is None:
            continue
        counts["attention"] += _size((stack.attn, stack.attn_norm, stack.ffn_norm))
        if isinstance(stack.ffn, Moe):
            counts["routed_experts"] += _size((stack.ffn.we1, stack.ffn.we2, stack.ffn.we3))
            counts["shared_experts"] += _size(stack.ffn.shared)
            counts["router"] += _size((stack.ffn.w_router, stack.ffn.e_bias))
        else:
            counts["dense_mlp"] += _size(stack.ffn)
    main = sum(counts.values())
    counts["total"] = main
    counts["mtp"] = _size(infos.mtp) if infos.mtp is not None else 0
    inactive = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * one_expert
    counts["activated"] = main - inactive
    counts["activated_matmul"] = main - inactive - counts["embed"]
    return counts


def param_bytes(tree) -> int:
    return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
