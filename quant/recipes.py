"""Named, composable quantization recipes: the one registry that quantizes a model (model/quantize.py) and plans
its memory (model/memory.py).

A recipe maps parameter groups, as every parameter declares its group (model/params.py), to a weight format and
whether activations meeting those weights are quantized too (W4A4 / W8A8: per block at run time, with a static
per-tensor scale from calibration for NVFP4); it also says whether the latent cache is FP8 and whether block
scales come from an MSE search instead of plain amax.

Groups: "attention" (every MLA projection: wq_a, wq_b, wkv_a, wk_b / wv_b, wo; "attention.wo" names wo alone),
"dense_mlp" (the dense layers' MLPs), "shared" (shared experts), "routed" (routed experts), "mtp" (the MTP
module's own linears; "mtp.eh_proj" names its input projection alone). Never quantized, in every recipe: the
embedding, the LM head, the router and its bias, the norms.

Named recipes (`RECIPES`); modifiers compose with '+': "+attn", "+attn_o", "+kv_fp8", "+search", "+w4a4" /
"+w4a16", "+mx_ceil":
    bf16          nothing quantized
    fp8_w8a8      DeepSeek's FP8 release: every linear of attention, the MLPs and the MTP module (but its eh_proj,
                  BF16 in the release) in FP8 (128x128 weight tiles, 1x128 dynamic activation blocks)
    r1_fp4        the published DeepSeek-R1-FP4: dense MLPs + shared + routed experts in NVFP4 W4A4 (gate and up of
                  each expert sharing one weight amax and one input scale), attention and MTP untouched, FP8 cache
    nvfp4_w4a16   the same linears, weights only        nvfp4_w4a4   weights and activations, BF16 cache
    nvfp4_experts routed experts in NVFP4 (weights only) on top of the FP8 release for everything else
    mxfp4_w4a16 / mxfp4_w4a4: MXFP4 in place of NVFP4  nvfp4_search  nvfp4_w4a16 with MSE-searched block scales
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from quant import formats as F
from quant.qarray import QArray, quantize, reduction_last

GROUPS = ("attention", "attention.wo", "dense_mlp", "shared", "routed", "mtp", "mtp.eh_proj")
R1_GROUPS = ("dense_mlp", "shared", "routed")


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one group gets: a weight format (None: left in the model dtype, to override a group's rule for one
    name) and whether activations are quantized (in the same format)."""

    fmt: str | None
    act: bool = False


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[tuple[str, Rule], ...] = ()  # (group, rule); a later entry overrides an earlier one
    kv_fp8: bool = False
    search: bool = False
    mx_rule: str = "ocp"

    def __post_init__(self):
        for group, rule in self.rules:
            if group not in GROUPS:
                raise ValueError(f"recipe {self.name!r}: unknown group {group!r}; known: {GROUPS}")
            if rule.fmt is not None and rule.fmt not in F.FORMATS:
                raise ValueError(f"recipe {self.name!r}: unknown format {rule.fmt!r}; known: {tuple(F.FORMATS)}")
            if self.search and rule.fmt == "fp8":
                raise ValueError(f"recipe {self.name!r}: scale search is defined for the FP4 formats only")

    def rule(self, group: str, name: str = "") -> Rule | None:
        """The rule for a parameter of `group` called `name` (e.g. "wo"), or None: left in the model dtype."""
        table = dict(self.rules)
        rule = table.get(f"{group}.{name}", table.get(group))
        return None if rule is None or rule.fmt is None else rule

    @property
    def quantizes(self) -> bool:
        return bool(self.rules)

    @property
    def static_activation_scales(self) -> bool:
        """Whether quantized activations need calibrated per-tensor scales (NVFP4 W4A4) or the cache its scales."""
        return self.kv_fp8 or any(r.act and r.fmt == "nvfp4" for _, r in self.rules)

    def quantize(self, w, group: str, name: str = "", *, k_axis: int, batch_ndim: int, amax=None,
                 input_scale=None, k_ndim: int = 1):
        """w quantized by this recipe's rule for (group, name), or w itself when the recipe leaves it alone."""
        rule = self.rule(group, name)
        if rule is None:
            return w
        block_scales = None
        if self.search:
            moved, _ = reduction_last(w, k_axis, k_ndim)
            if rule.fmt == "nvfp4":
                s_t = F.nvfp4_tensor_scale(_amax(w, batch_ndim) if amax is None else amax)
                block_scales = nvfp4_search_block_scales(moved, s_t.reshape(*s_t.shape,
                                                                           *([1] * (moved.ndim - batch_ndim))))
            else:
                block_scales = mxfp4_search_exponents(moved)
        return quantize(w, rule.fmt, k_axis=k_axis, batch_ndim=batch_ndim, amax=amax,
                        act=rule.fmt if rule.act else None, input_scale=input_scale, mx_rule=self.mx_rule,
                        block_scales=block_scales, k_ndim=k_ndim)


def _every(groups, fmt: str, act: bool) -> tuple[tuple[str, Rule], ...]:
    return tuple((g, Rule(fmt, act)) for g in groups)


# the release keeps the MTP module's eh_proj in BF16, like the embedding, the head, the norms and the router
FP8_RELEASE = _every(("attention",) + R1_GROUPS + ("mtp",), "fp8", True) + (("mtp.eh_proj", Rule(None)),)

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("bf16"),
    Recipe("fp8_w8a8", FP8_RELEASE),
    Recipe("r1_fp4", _every(R1_GROUPS, "nvfp4", True), kv_fp8=True),
    Recipe("nvfp4_w4a16", _every(R1_GROUPS, "nvfp4", False)),
    Recipe("nvfp4_w4a4", _every(R1_GROUPS, "nvfp4", True)),
    Recipe("nvfp4_experts", FP8_RELEASE + _every(("routed",), "nvfp4", False)),
    Recipe("mxfp4_w4a16", _every(R1_GROUPS, "mxfp4", False)),
    Recipe("mxfp4_w4a4", _every(R1_GROUPS, "mxfp4", True)),
    Recipe("nvfp4_search", _every(R1_GROUPS, "nvfp4", False), search=True),
)}


def _base_rule(r: Recipe) -> Rule:
    """The rule of the recipe's main groups (routed experts first), which the +attn modifiers extend."""
    return r.rule("routed") or r.rule("dense_mlp") or Rule("nvfp4")


_MODIFIERS = {
    "attn": lambda r: dataclasses.replace(r, rules=r.rules + (("attention", _base_rule(r)),)),
    "attn_o": lambda r: dataclasses.replace(r, rules=r.rules + (("attention.wo", _base_rule(r)),)),
    "kv_fp8": lambda r: dataclasses.replace(r, kv_fp8=True),
    "search": lambda r: dataclasses.replace(r, search=True),
    "w4a4": lambda r: dataclasses.replace(r, rules=tuple((g, Rule(x.fmt, x.act or x.fmt in ("nvfp4", "mxfp4")))
                                                          for g, x in r.rules)),
    "w4a16": lambda r: dataclasses.replace(r, rules=tuple((g, Rule(x.fmt, x.act and x.fmt not in ("nvfp4", "mxfp4")))
                                                           for g, x in r.rules)),
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


def _amax(w, batch_ndim: int):
    """Per-matrix amax: over every axis after the leading batch (layer, expert) axes."""
    return jnp.max(jnp.abs(w.astype(F.F32)), axis=tuple(range(batch_ndim, w.ndim)))


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
            total += leaf.size * jnp.dtype(leaf.dtype).itemsize
    return int(total)


__all__ = ["GROUPS", "RECIPES", "Recipe", "Rule", "get_recipe", "mxfp4_search_exponents",
           "nvfp4_search_block_scales", "weight_bytes"]
