"""Named, composable quantization recipes and `quantize_params`.

A recipe says which linears are quantized (groups below), to which weight format, whether activations are
quantized too (W4A4 / W8A8: per block at run time, with a static per-tensor scale from calibration), whether the
latent cache is FP8, and whether block scales come from an MSE search instead of plain amax.

Groups: "dense_mlp" (the dense layers' MLPs), "shared" (shared experts), "routed" (routed experts), "attn" (every
MLA projection: wq_a, wq_b, wkv_a, wk_b/wv_b, wo), "attn_o" (wo only). Never quantized, in every recipe: the
embedding, the LM head, the router and its bias, the norms, and the MTP module (as in the published checkpoint).

Named recipes (`RECIPES`); modifiers compose with '+': "+attn", "+attn_o", "+kv_fp8", "+search", "+w4a4"/"+w4a16":
    r1_fp4        the published DeepSeek-R1-FP4: dense MLPs + shared + routed experts in NVFP4 W4A4, gate and up of
                  each expert sharing one weight amax and one input scale, attention/head/embedding/router/MTP
                  untouched, FP8 latent cache
    nvfp4_w4a16   the same linears, weights only        nvfp4_w4a4   weights and activations, BF16 cache
    nvfp4_experts routed experts only (W4A16)           mxfp4_w4a16 / mxfp4_w4a4: MXFP4 in place of NVFP4
    fp8_w8a8      DeepSeek's FP8 release: every linear of attention and MLPs, 128x128 weight tiles, 1x128
                  dynamic activation blocks
    nvfp4_search  nvfp4_w4a16 with MSE-searched block scales
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from model.params import Attention, Moe, Params
from quant import formats as F
from quant.qarray import QArray, quantize

GROUPS = ("dense_mlp", "shared", "routed", "attn", "attn_o")
R1_GROUPS = ("dense_mlp", "shared", "routed")


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    weight_fmt: str | None = None  # None: nothing quantized (the baseline)
    groups: tuple[str, ...] = ()
    act: bool = False  # W4A4 / W8A8
    kv_fp8: bool = False
    search: bool = False
    mx_rule: str = "ocp"

    def __post_init__(self):
        bad = set(self.groups) - set(GROUPS)
        if bad:
            raise ValueError(f"recipe {self.name!r}: unknown groups {sorted(bad)}; known: {GROUPS}")
        if self.search and self.weight_fmt == "fp8":
            raise ValueError(f"recipe {self.name!r}: scale search is defined for the FP4 formats only")

    @property
    def act_fmt(self) -> str | None:
        return self.weight_fmt if self.act else None


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("bf16"),
    Recipe("fp8_w8a8", "fp8", R1_GROUPS + ("attn",), act=True),
    Recipe("r1_fp4", "nvfp4", R1_GROUPS, act=True, kv_fp8=True),
    Recipe("nvfp4_w4a16", "nvfp4", R1_GROUPS),
    Recipe("nvfp4_w4a4", "nvfp4", R1_GROUPS, act=True),
    Recipe("nvfp4_experts", "nvfp4", ("routed",)),
    Recipe("mxfp4_w4a16", "mxfp4", R1_GROUPS),
    Recipe("mxfp4_w4a4", "mxfp4", R1_GROUPS, act=True),
    Recipe("nvfp4_search", "nvfp4", R1_GROUPS, search=True),
)}

_MODIFIERS = {
    "attn": lambda r: dataclasses.replace(r, groups=tuple(dict.fromkeys(r.groups + ("attn",)))),
    "attn_o": lambda r: dataclasses.replace(r, groups=tuple(dict.fromkeys(r.groups + ("attn_o",)))),
    "kv_fp8": lambda r: dataclasses.replace(r, kv_fp8=True),
    "search": lambda r: dataclasses.replace(r, search=True),
    "w4a4": lambda r: dataclasses.replace(r, act=True),
    "w4a16": lambda r: dataclasses.replace(r, act=False),
    "mx_ceil": lambda r: dataclasses.replace(r, mx_rule="ceil"),
}


def get_recipe(spec: str | Recipe) -> Recipe:
    """'r1_fp4', or a named recipe with modifiers: 'nvfp4_w4a4+attn_o+kv_fp8'."""
    if isinstance(spec, Recipe):
        return spec
    base, *mods = spec.split("+")
    if base not in RECIPES:
        raise ValueError(f"unknown recipe {base!r}; choose from {sorted(RECIPES)} (modifiers: "
                         f"{', '.join('+' + m for m in _MODIFIERS)})")
    r = RECIPES[base]
    for m in mods:
        if m not in _MODIFIERS:
            raise ValueError(f"unknown recipe modifier {m!r} in {spec!r}; known: {sorted(_MODIFIERS)}")
        r = _MODIFIERS[m](r)
    return dataclasses.replace(r, name=spec)


# ---- scale search --------------------------------------------------------------------------------------------

def nvfp4_search_block_scales(x: jax.Array, s_tensor: jax.Array, n: int = 24, lo: float = 0.55) -> jax.Array:
    """Per 16-block E4M3 scale minimising the block's squared error, over candidates c * amax/6 (c in [lo, 1])
    rounded to E4M3, the plain amax rule (c = 1) among them, so it is never worse. x: [..., K]; s_tensor
    broadcasts to [..., 1]. Returns E4M3 scales [..., K/16]."""
    xb = x.astype(F.F32).reshape(*x.shape[:-1], x.shape[-1] // 16, 16)
    s_t = jnp.asarray(s_tensor, F.F32)
    base = F.nvfp4_block_scales(xb, s_t).astype(F.F32)  # amax rule (NaN for non-finite blocks)
    best_s, best_err = base, None
    for c in np.linspace(lo, 1.0, n):
        s = F.e4m3(jnp.maximum(base * F.F32(c), F.E4M3_MIN_SUBNORMAL)).astype(F.F32)
        q = F.e2m1_decode(F.e2m1_encode(F.div(xb, (s * s_t)[..., None]))) * (s * s_t)[..., None]
        err = jnp.sum((q - xb) ** 2, -1)
        if best_err is None:
            best_s, best_err = s, err
        else:
            better = err < best_err
            best_s, best_err = jnp.where(better, s, best_s), jnp.where(better, err, best_err)
    return F.e4m3(jnp.where(jnp.isnan(base), jnp.nan, best_s))


def mxfp4_search_exponents(x: jax.Array) -> jax.Array:
    """Per 32-block the better of the OCP exponent e and e + 1 (no clipping) by squared error."""
    xb = x.astype(F.F32).reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    e0 = F.mxfp4_exponents(xb, "ocp")

    def err(e):
        q = F.e2m1_decode(F.e2m1_encode(jnp.ldexp(xb, -e[..., None])))
        return jnp.sum((jnp.ldexp(q, e[..., None]) - xb) ** 2, -1)
    return jnp.where(err(e0 + 1) < err(e0), e0 + 1, e0)


# ---- quantize_params -----------------------------------------------------------------------------------------

def _q(w, recipe: Recipe, *, k_axis: int, batch_ndim: int, amax=None, input_scale=None) -> QArray:
    block_scales = None
    if recipe.search:
        moved = jnp.moveaxis(w, k_axis, -1)
        if recipe.weight_fmt == "nvfp4":
            s_t = F.nvfp4_tensor_scale(_amax(w, batch_ndim) if amax is None else amax)
            block_scales = nvfp4_search_block_scales(moved, s_t.reshape(*s_t.shape, *([1] * (moved.ndim - batch_ndim))))
        else:
            block_scales = mxfp4_search_exponents(moved)
    return quantize(w, recipe.weight_fmt, k_axis=k_axis, batch_ndim=batch_ndim, amax=amax, act=recipe.act_fmt,
                    input_scale=input_scale, mx_rule=recipe.mx_rule, block_scales=block_scales)


def _amax(w, batch_ndim: int):
    """Per-matrix amax: over every axis after the leading batch (layer, expert) axes."""
    return jnp.max(jnp.abs(w.astype(F.F32)), axis=tuple(range(batch_ndim, w.ndim)))


def _gate_up(p, names, recipe, batch_ndim, scales):
    """Gate and up (w1, w3) share one per-tensor weight amax and one input scale, as the published recipe does."""
    w1, w3, w2 = (getattr(p, n) for n in names)
    amax = jnp.maximum(_amax(w1, batch_ndim), _amax(w3, batch_ndim)) if recipe.weight_fmt == "nvfp4" else None
    s_in, s_hid = scales if scales is not None else (None, None)
    return {names[0]: _q(w1, recipe, k_axis=-2, batch_ndim=batch_ndim, amax=amax, input_scale=s_in),
            names[1]: _q(w3, recipe, k_axis=-2, batch_ndim=batch_ndim, amax=amax, input_scale=s_in),
            names[2]: _q(w2, recipe, k_axis=-2, batch_ndim=batch_ndim, input_scale=s_hid)}


# reduction axis of each attention weight (stacked: a leading layer axis), see model/params.py for the layouts
ATTN_K_AXIS = {"wq_a": -2, "wq_b": -3, "wkv_a": -2, "wk_b": -1, "wv_b": -2, "wo": -2}


def quantize_params(params: Params, recipe: str | Recipe, input_scales: dict | None = None) -> Params:
    """The parameter tree with the recipe's linears replaced by QArrays (everything else untouched).

    input_scales: static activation scales from `quant.calibrate.calibrate` (W4A4 / W8A8 with NVFP4 need them for
    static per-tensor scales; without them the per-tensor activation scale is computed at run time).
    """
    r = get_recipe(recipe)
    if r.weight_fmt is None:
        return params
    s = input_scales or {}
    out = params
    if "dense_mlp" in r.groups and params.dense_layers is not None:
        mlp = params.dense_layers.ffn
        out = out.replace(dense_layers=out.dense_layers.replace(
            ffn=mlp.replace(**_gate_up(mlp, ("w1", "w3", "w2"), r, 1, s.get("dense_mlp")))))
    if params.moe_layers is not None:
        moe: Moe = out.moe_layers.ffn
        if "shared" in r.groups:
            moe = moe.replace(shared=moe.shared.replace(**_gate_up(moe.shared, ("w1", "w3", "w2"), r, 1,
                                                                    s.get("shared"))))
        if "routed" in r.groups:
            moe = moe.replace(**_gate_up(moe, ("we1", "we3", "we2"), r, 2, s.get("routed")))
        out = out.replace(moe_layers=out.moe_layers.replace(ffn=moe))
    names = tuple(ATTN_K_AXIS) if "attn" in r.groups else ("wo",) if "attn_o" in r.groups else ()
    for stack in ("dense_layers", "moe_layers"):
        layer = getattr(out, stack)
        if layer is None or not names:
            continue
        sa = s.get(f"attn_{stack}", {})
        attn: Attention = layer.attn
        attn = attn.replace(**{n: _q(getattr(attn, n), r, k_axis=ATTN_K_AXIS[n], batch_ndim=1,
                                     input_scale=sa.get(n)) for n in names})
        out = out.replace(**{stack: layer.replace(attn=attn)})
    return out


def weight_bytes(params, float_itemsize: int | None = None) -> int:
    """Bytes of every parameter as stored (QArrays: packed codes + scales); float_itemsize counts unquantized
    floating-point matrices at that width (2: as BF16) instead of their dtype's."""
    total = 0
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)):
        if isinstance(leaf, QArray):
            total += leaf.nbytes
        elif float_itemsize and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim > 1:
            total += leaf.size * float_itemsize
        else:
            total += leaf.size * leaf.dtype.itemsize
    return int(total)


__all__ = [
    "GROUPS",
    "RECIPES",
    "Recipe",
    "get_recipe",
    "mxfp4_search_exponents",
    "nvfp4_search_block_scales",
    "quantize_params",
    "weight_bytes",
]
