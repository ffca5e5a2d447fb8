"""Parameter pytrees, declared once as `ArrayInfo(shape, dtype, logical_axes, group, reduction, init)`.

`param_infos(cfg)` is the single declaration. `init`, `abstract_params` (no allocation), the parameter counts,
the sharding specs (model/placement.py), the quantization recipes and the calibration probes (model/quantize.py),
the memory planner (model/memory.py) and the checkpoint loaders all derive from it: the logical axes say how a
parameter is split over a mesh, the group which recipe rule applies (attention, dense_mlp, shared, routed, router,
embedding, norm; every linear of the MTP module is in "mtp"), the reduction axis how it is quantized. Layers are
stacked on a leading `layers` axis: the dense-first layers form one stack, the MoE layers another, and each stack
runs under `jax.lax.scan`.

Layouts (letters from `model/__init__.py`): linear weights are stored [in, out] so einsums read left to right;
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
from quant.qarray import QArray

Array = jax.Array

BATCH_AXES = ("layers", "experts")  # leading axes of independent matrices (a stack)
# the routed experts' logical axes (one layer): what expert parallelism splits
EXPERT_AXES = {"we1": ("experts", "embed", "expert_ffn"), "we3": ("experts", "embed", "expert_ffn"),
               "we2": ("experts", "expert_ffn", "embed")}
GROUPS = ("attention", "dense_mlp", "shared", "routed", "router", "embedding", "norm", "mtp")


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """Declaration of one parameter: shape, dtype, one logical axis name per dimension, its group, the logical axis
    its matmul reduces over (None: not a matmul weight), and its initialiser."""

    shape: tuple[int, ...]
    dtype: Any
    logical_axes: tuple[str | None, ...]
    group: str
    reduction: str | tuple[str, ...] | None = None  # several: consecutive axes reduced together
    init: str = "normal"  # "normal" (std = initializer_range), "ones" or "zeros"
    fan_in_axes: tuple[str, ...] | None = None  # the matmul's input axes; default: the reduction axis, else the
    # first axis after the stack axes (the embedding table's rows)

    def __post_init__(self):
        if len(self.shape) != len(self.logical_axes):
            raise ValueError(f"ArrayInfo: shape {self.shape} has {len(self.shape)} dims but logical axes "
                             f"{self.logical_axes} name {len(self.logical_axes)}")
        if self.group not in GROUPS:
            raise ValueError(f"ArrayInfo: unknown group {self.group!r}; one of {GROUPS}")
        red = self.reduction_axes
        if red and tuple(self.logical_axes[self.logical_axes.index(red[0]):][:len(red)]) != red:
            raise ValueError(f"ArrayInfo: reduction axes {red} are not consecutive axes of {self.logical_axes}")

    @property
    def reduction_axes(self) -> tuple[str, ...]:
        if self.reduction is None:
            return ()
        return (self.reduction,) if isinstance(self.reduction, str) else tuple(self.reduction)

    @property
    def k_ndim(self) -> int:
        return max(len(self.reduction_axes), 1)

    @property
    def k_axis(self) -> int:
        """The reduction axis as a negative index (it stays right when leading stack axes are stripped)."""
        return self.logical_axes.index(self.reduction_axes[0]) - len(self.shape)

    @property
    def batch_ndim(self) -> int:
        """Leading axes that stack independent matrices (layers, experts)."""
        return next((i for i, a in enumerate(self.logical_axes) if a not in BATCH_AXES), len(self.shape))

    @property
    def fan_in(self) -> int:
        axes = self.fan_in_axes or self.reduction_axes or (self.logical_axes[self.batch_ndim],)
        return math.prod(n for n, a in zip(self.shape, self.logical_axes) if a in axes)

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
    # Not a parameter: inside the scan over layers the expert stacks stay whole ([L, E, ...]) and this is the
    # layer's index into them (model/moe.py, `ExpertView`); None where the stacks hold one layer's [E, ...].
    layer: Array | None = None


@struct.dataclass
class Layer:
    attn_norm: Array  # [D]
    attn: Attention
    ffn_norm: Array  # [D]
    ffn: Mlp | Moe


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

def _norm(n: int, dt, axis: str = "embed") -> ArrayInfo:
    return ArrayInfo((n,), dt, (axis,), "norm", init="ones")


def _attention_infos(cfg: Config) -> Attention:
    d, q, c, r = cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    n, h, v, dt = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.param_dtype
    return Attention(
        wq_a=ArrayInfo((d, q), dt, ("embed", "q_lora"), "attention", "embed"),
        q_norm=_norm(q, dt, "q_lora"),
        wq_b=ArrayInfo((q, n, h + r), dt, ("q_lora", "heads", "qk_head"), "attention", "q_lora"),
        wkv_a=ArrayInfo((d, c + r), dt, ("embed", "kv_lora_rope"), "attention", "embed"),
        kv_norm=_norm(c, dt, "kv_lora"),
        # heads lead in wk_b / wv_b: the absorbed einsums batch over heads, and XLA wants batch dims leading
        wk_b=ArrayInfo((n, h, c), dt, ("heads", "qk_nope", "kv_lora"), "attention", "kv_lora"),
        wv_b=ArrayInfo((n, c, v), dt, ("heads", "kv_lora", "v_head"), "attention", "kv_lora"),
        # reduced over heads x value dims at once, as one matmul (and as DeepSeek's FP8 release quantizes o_proj)
        wo=ArrayInfo((n, v, d), dt, ("heads", "v_head", "embed"), "attention", ("heads", "v_head")),
    )


def _mlp_infos(d: int, f: int, dt, group: str, axis: str = "ffn") -> Mlp:
    return Mlp(w1=ArrayInfo((d, f), dt, ("embed", axis), group, "embed"),
               w3=ArrayInfo((d, f), dt, ("embed", axis), group, "embed"),
               w2=ArrayInfo((f, d), dt, (axis, "embed"), group, axis))


def _moe_infos(cfg: Config) -> Moe:
    d, e, m, dt = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.param_dtype
    return Moe(
        w_router=ArrayInfo((d, e), dt, ("embed", "experts_router"), "router", "embed"),
        e_bias=ArrayInfo((e,), jnp.float32, ("experts_router",), "router", init="zeros"),
        we1=ArrayInfo((e, d, m), dt, EXPERT_AXES["we1"], "routed", "embed"),
        we3=ArrayInfo((e, d, m), dt, EXPERT_AXES["we3"], "routed", "embed"),
        we2=ArrayInfo((e, m, d), dt, EXPERT_AXES["we2"], "routed", "expert_ffn"),
        shared=_mlp_infos(d, m * cfg.n_shared_experts, dt, "shared", "shared_ffn"),
    )


def _layer_infos(cfg: Config, moe: bool) -> Layer:
    d, dt = cfg.hidden_size, cfg.param_dtype
    ffn = _moe_infos(cfg) if moe else _mlp_infos(d, cfg.intermediate_size, dt, "dense_mlp")
    return Layer(attn_norm=_norm(d, dt), attn=_attention_infos(cfg), ffn_norm=_norm(d, dt), ffn=ffn)


def unstacked(tree):
    """The declarations of one slice of a stack (the leading axis dropped): a layer of the stacked layers, one
    expert of an expert stack."""
    return jax.tree.map(lambda i: dataclasses.replace(i, shape=i.shape[1:], logical_axes=i.logical_axes[1:]), tree,
                        is_leaf=is_info)


def _stack(tree, n: int):
    return jax.tree.map(lambda i: i.stacked(n), tree, is_leaf=is_info)


def _as_mtp(tree):
    """The MTP module's linears form their own group (a recipe quantizes them or not as one, as released)."""
    quantizable = ("attention", "dense_mlp", "shared", "routed")
    return jax.tree.map(lambda i: dataclasses.replace(i, group="mtp") if i.group in quantizable else i, tree,
                        is_leaf=is_info)


def param_infos(cfg: Config, *, with_mtp: bool | None = None) -> Params:
    """The declaration tree: a `Params` whose leaves are `ArrayInfo`s."""
    d, v, dt = cfg.hidden_size, cfg.vocab_size, cfg.param_dtype
    with_mtp = cfg.num_nextn_predict_layers > 0 if with_mtp is None else with_mtp
    n_dense, n_moe = cfg.first_k_dense_replace, cfg.n_moe_layers
    mtp = None
    if with_mtp:
        mtp = Mtp(enorm=_norm(d, dt), hnorm=_norm(d, dt),
                  eh_proj=ArrayInfo((2 * d, d), dt, ("embed_concat", "embed"), "mtp", "embed_concat"),
                  layer=_as_mtp(_layer_infos(cfg, moe=True)), norm=_norm(d, dt))
    return Params(
        embed=ArrayInfo((v, d), dt, ("vocab", "embed"), "embedding"),
        dense_layers=_stack(_layer_infos(cfg, moe=False), n_dense) if n_dense else None,
        moe_layers=_stack(_layer_infos(cfg, moe=True), n_moe) if n_moe else None,
        norm=_norm(d, dt),
        lm_head=ArrayInfo((d, v), dt, ("embed", "vocab"), "embedding", "embed"),
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
    """Parameter counts by declared group (attention, dense_mlp, shared, routed, router, embedding, norm) over the
    main model, its total, the MTP module, and the activated count per token.

    `activated` follows DeepSeek's convention: every non-expert parameter of the main model plus
    `num_experts_per_tok` routed experts per MoE layer (the embedding row lookup counted in full, as in the
    37B figure; `activated_matmul` leaves the embedding table, `embed`, out).
    """
    infos = param_infos(cfg, with_mtp=cfg.num_nextn_predict_layers > 0)
    counts = dict.fromkeys((g for g in GROUPS if g != "mtp"), 0)
    for info in jax.tree.leaves(infos.replace(mtp=None), is_leaf=is_info):
        counts[info.group] += math.prod(info.shape)
    counts["total"] = sum(counts.values())
    counts["embed"] = math.prod(infos.embed.shape)
    counts["mtp"] = _size(infos.mtp) if infos.mtp is not None else 0
    one_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * one_expert
    counts["activated"] = counts["total"] - inactive
    counts["activated_matmul"] = counts["activated"] - counts["embed"]
    return counts


def param_bytes(tree) -> int:
    return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def param_table(params: Params, cfg: Config) -> str:
    """The parameter tree as a table: one line per parameter with its logical shape, how it is stored (dtype, or
    a quantized format with its codes), its logical axes (what the sharding rules map to the mesh), its bytes, and
    its placement where it is on more than one device."""
    infos = dict(jax.tree_util.tree_flatten_with_path(param_infos(cfg, with_mtp=params.mtp is not None),
                                                      is_leaf=is_info)[0])
    rows = [("parameter", "shape", "stored as", "logical axes", "MB", "placement")]
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]:
        info = infos.get(path)
        name = jax.tree_util.keystr(path).lstrip(".")
        nbytes = param_bytes(leaf)
        total += nbytes
        stored = f"{leaf.fmt} ({leaf.codes.dtype} codes)" if isinstance(leaf, QArray) else str(leaf.dtype)
        arr = leaf.codes if isinstance(leaf, QArray) else leaf
        sharding = getattr(arr, "sharding", None)
        spec = getattr(sharding, "spec", None)
        placed = str(tuple(spec)) if spec is not None and len(sharding.device_set) > 1 else ""
        axes = ", ".join(str(a) for a in info.logical_axes) if info is not None else ""
        rows.append((name, str(tuple(leaf.shape)), stored, axes, f"{nbytes / 1e6:.2f}", placed))
    rows.append(("total", "", "", "", f"{total / 1e6:.2f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
