"""Load DeepSeek-V3/R1 weights in the HF / DeepSeek release layout (safetensors) into `Params`.

One table maps checkpoint names to ours; every tensor is checked for presence, shape and dtype against the
declaration (`param_infos`) before anything is assembled, and the error names each missing, misshapen, mistyped,
unexpected or non-finite tensor. The shards are read tensor by tensor through their index (model/io/safetensors.py,
which knows FP8).

FP8 release weights (`float8_e4m3fn` with `weight_scale_inv` per 128x128 block, partial edge blocks included) stay
FP8: each becomes a QArray holding the release's own codes and scales, bit for bit. The release stores a linear
[out, in], which is exactly QArray's stored layout (output axes flattened, the reduction last); the model runs them
as the `fp8_w8a8` recipe does (activations in 1x128 FP8 blocks at run time; `fp8_activations=False` keeps them in
the compute dtype). kv_b_proj splits into the key half (wk_b) and the value half (wv_b) per head by whole 128-row
tiles, exact when the key and value head dims are multiples of 128 (DeepSeek-V3's 128 and 128); otherwise those two
are dequantized. BF16 tensors stay in the compute dtype (`dtype=`, the config's by default).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from model.config import Config
from model.io.errors import CheckpointError, require_directory
from model.io.layered import item_names
from model.io.safetensors import TensorDirectory
from model.params import Attention, Layer, Mlp, Moe, Mtp, Params, is_info, param_infos, unstacked
from quant.qarray import QArray, _moved_perm

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
log = logging.getLogger("r1jax.io")


def _check_grid(shape, grid, block: int = 128) -> np.ndarray:
    """A float32 stand-in of `shape` (no memory) after checking the FP8 scale grid fits it."""
    want = (math.ceil(shape[0] / block), math.ceil(shape[1] / block))
    if tuple(grid) != want:
        raise CheckpointError(f"FP8 scale grid {tuple(grid)} does not fit weight {tuple(shape)}: expected {want}")
    return np.broadcast_to(np.zeros((), np.float32), shape)


def dequant_fp8_blocks(w: np.ndarray, scale_inv: np.ndarray, block: int = 128) -> np.ndarray:
    """W[i, j] = q[i, j] * scale_inv[i // 128, j // 128]; the grid is ceil(out/128) x ceil(in/128)."""
    rows, cols = w.shape
    _check_grid(w.shape, scale_inv.shape, block)
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)[:rows, :cols]
    return w.astype(np.float32) * s


# Each entry: our field -> (checkpoint suffix, transform from the checkpoint array to our layout, the kv_b half).
def _t(a):
    return a.T


def _attention_map(cfg: Config) -> dict[str, tuple[str, Callable | None, str | None]]:
    n, h, v, q, c = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.q_lora_rank,
                     cfg.kv_lora_rank)

    def kv_b(part):
        def f(a):  # [N*(H+V), C] -> [N, H, C] or [N, C, V]
            a = a.reshape(n, h + v, c)
            return a[:, :h] if part == "k" else a[:, h:].transpose(0, 2, 1)
        return f

    return {
        "wq_a": ("self_attn.q_a_proj.weight", _t, None),
        "q_norm": ("self_attn.q_a_layernorm.weight", None, None),
        "wq_b": ("self_attn.q_b_proj.weight", lambda a: a.T.reshape(q, n, -1), None),
        "wkv_a": ("self_attn.kv_a_proj_with_mqa.weight", _t, None),
        "kv_norm": ("self_attn.kv_a_layernorm.weight", None, None),
        "wk_b": ("self_attn.kv_b_proj.weight", kv_b("k"), "k"),
        "wv_b": ("self_attn.kv_b_proj.weight", kv_b("v"), "v"),
        "wo": ("self_attn.o_proj.weight", lambda a: a.T.reshape(n, v, -1), None),
    }


_MLP = {"w1": "gate_proj.weight", "w3": "up_proj.weight", "w2": "down_proj.weight"}


def _words(codes: np.ndarray) -> np.ndarray:
    """FP8 codes [..., K] -> uint16 [..., K/2], the even element in the low byte (quant.formats.pack_bytes)."""
    b = np.asarray(codes).view(np.uint8)
    return b[..., 0::2].astype(np.uint16) | (b[..., 1::2].astype(np.uint16) << 8)


class _Reader:
    """Reads tensors by name into our layout (FP8 release weights as QArrays), recording what is missing,
    misshapen, mistyped, non-finite or unused, with the checkpoint's own tensor names in every message."""

    def __init__(self, tensors: Mapping[str, np.ndarray], cfg: Config, *, fp8_activations: bool = True,
                 check_finite: bool = False, dry: bool = False):
        self.tensors, self.cfg = tensors, cfg
        self.fp8_act, self.check_finite, self.dry = fp8_activations, check_finite and not dry, dry
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.misshapen: list[str] = []
        self.mistyped: list[str] = []
        self.nonfinite: list[str] = []

    def get(self, name: str, info, fn: Callable | None = None, part: str | None = None):
        if name not in self.tensors:
            self.missing.append(name)
            return None
        self.used.add(name)
        a = self._array(name)
        scale = name + "_scale_inv"
        if scale in self.tensors:
            self.used.add(scale)
        if a.dtype == FP8 and scale not in self.tensors or not (jnp.issubdtype(a.dtype, jnp.floating)):
            self.mistyped.append(f"{name} is {a.dtype.name}" + (" without weight_scale_inv" if a.dtype == FP8 else
                                                                 ", not a floating-point dtype"))
            return None
        if a.dtype == FP8 and (part is None or self._exact_halves()):
            return self._fp8(name, a, self._array(scale), info, part)
        if scale in self.tensors:  # dequantized: an FP8 kv_b whose halves do not fill whole tiles, or float weights
            try:
                a = (_check_grid(a.shape, self._array(scale).shape) if self.dry
                     else dequant_fp8_blocks(np.asarray(a), np.asarray(self._array(scale))))
            except CheckpointError as e:
                self.misshapen.append(f"{name}: {e}")
                return None
        raw_shape = a.shape
        try:
            a = fn(np.asarray(a)) if fn else np.asarray(a)
        except ValueError:
            a = None
        if a is None or tuple(a.shape) != info.shape:
            self.misshapen.append(f"{name} has shape {tuple(raw_shape)}, which does not give the config's "
                                  f"{info.shape} [{', '.join(str(x) for x in info.logical_axes)}]")
            return None
        if self.check_finite and not np.isfinite(np.asarray(a, np.float32)).all():
            self.nonfinite.append(name)
        return a

    def _array(self, name: str) -> np.ndarray:
        """The tensor (a memory map), or in a dry run a stand-in of its shape and dtype that holds no memory."""
        if not self.dry:
            return self.tensors[name]
        if hasattr(self.tensors, "shape"):
            shape, dtype = self.tensors.shape(name), self.tensors.dtype(name)
        else:
            shape, dtype = self.tensors[name].shape, self.tensors[name].dtype
        return np.broadcast_to(np.zeros((), dtype), shape)

    def _exact_halves(self) -> bool:
        return self.cfg.qk_nope_head_dim % 128 == 0 and self.cfg.v_head_dim % 128 == 0

    def _fp8(self, name: str, codes, scales, info, part: str | None):
        """An FP8 release weight [out, in] with its 128x128 scale grid -> a QArray of the declaration's layout."""
        nd = len(info.shape)
        perm = _moved_perm(nd, info.k_axis, info.k_ndim)
        out_dims = [info.shape[i] for i in perm[:nd - info.k_ndim]]
        k_dims = [info.shape[i] for i in perm[nd - info.k_ndim:]]
        k = math.prod(k_dims)
        rows = math.prod(out_dims)
        cfg = self.cfg
        if part is not None:  # the key or value half of kv_b_proj [N*(H+V), C], per head, in whole 128-row tiles
            n, h, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
            lo, hi = (0, h) if part == "k" else (h, h + v)
            if codes.shape != (n * (h + v), k):
                self.misshapen.append(f"{name} has shape {tuple(codes.shape)}, not the config's {(n * (h + v), k)}")
                return None
            codes = np.asarray(codes).reshape(n, h + v, k)[:, lo:hi].reshape(rows, k)
            tiles = (h + v) // 128
            if scales.shape != (n * tiles, math.ceil(k / 128)):
                self.misshapen.append(f"{name}_scale_inv has shape {tuple(scales.shape)}, not the 128x128 grid "
                                      f"{(n * tiles, math.ceil(k / 128))} of {tuple(codes.shape)}")
                return None
            scales = np.asarray(scales).reshape(n, tiles, -1)[:, lo // 128:hi // 128].reshape(-1, scales.shape[-1])
        if tuple(codes.shape) != (rows, k) or k % 2:
            self.misshapen.append(f"{name} has shape {tuple(codes.shape)}, which does not give the config's "
                                  f"{info.shape} [{', '.join(str(x) for x in info.logical_axes)}] (stored "
                                  f"[{rows}, {k}])")
            return None
        want = (math.ceil(rows / 128), math.ceil(k / 128))
        if tuple(scales.shape) != want:
            self.misshapen.append(f"{name}_scale_inv has shape {tuple(scales.shape)}, not the 128x128 grid {want} of "
                                  f"{(rows, k)}")
            return None
        if self.check_finite and (not np.isfinite(np.asarray(scales)).all()
                                  or (np.asarray(codes).view(np.uint8) & 0x7F == 0x7F).any()):
            self.nonfinite.append(name)
        if self.dry:
            return codes
        return QArray(_words(codes).reshape(*out_dims, k // 2), np.asarray(scales, np.float32), fmt="fp8",
                      k_axis=info.k_axis, n_out=nd - info.k_ndim, act="fp8" if self.fp8_act else None,
                      dtype=cfg.dtype, k_dims=tuple(k_dims) if info.k_ndim > 1 else ())


def _layer_arrays(r: _Reader, prefix: str, cfg: Config, info: Layer) -> dict:
    out: dict = {"attn_norm": r.get(prefix + "input_layernorm.weight", info.attn_norm),
                 "ffn_norm": r.get(prefix + "post_attention_layernorm.weight", info.ffn_norm), "attn": {}}
    for field, (suffix, fn, part) in _attention_map(cfg).items():
        out["attn"][field] = r.get(prefix + suffix, getattr(info.attn, field), fn, part)
    f = info.ffn
    if not isinstance(f, Moe):
        out["ffn"] = {k: r.get(prefix + "mlp." + s, getattr(f, k), _t) for k, s in _MLP.items()}
        return out
    ffn = {"w_router": r.get(prefix + "mlp.gate.weight", f.w_router, _t),
           "e_bias": r.get(prefix + "mlp.gate.e_score_correction_bias", f.e_bias),
           "shared": {k: r.get(prefix + "mlp.shared_experts." + s, getattr(f.shared, k), _t) for k, s in _MLP.items()}}
    for k, s in _MLP.items():
        one = unstacked(getattr(f, "we" + k[1]))
        ffn["we" + k[1]] = [r.get(f"{prefix}mlp.experts.{e}.{s}", one, _t) for e in range(cfg.n_routed_experts)]
    out["ffn"] = ffn
    return out


def _build_layer(d: dict, moe: bool) -> Layer:
    """A Layer from _layer_arrays' dict, each expert stack made from its list (None where any expert is)."""
    attn = Attention(**d["attn"])
    if moe:
        experts = {k: None if any(p is None for p in v) else _stack(v) for k, v in d["ffn"].items()
                   if k.startswith("we")}
        ffn = Moe(**{**d["ffn"], **experts, "shared": Mlp(**d["ffn"]["shared"])})
    else:
        ffn = Mlp(**d["ffn"])
    return Layer(attn_norm=d["attn_norm"], attn=attn, ffn_norm=d["ffn_norm"], ffn=ffn)


def _stack(items: list):
    """Arrays or QArrays of one kind stacked on a new leading axis (codes and scales alike)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *items)


def _stack_layers(layers: list[Layer]) -> Layer:
    def one(*xs):
        return None if any(x is None for x in xs) else _stack(list(xs))
    return jax.tree.map(one, *layers, is_leaf=lambda x: x is None or isinstance(x, QArray))


def item_prefix(cfg: Config, item: str) -> str:
    """The checkpoint name prefix of a layer item ('moe_layers.002' -> 'model.layers.3.' with one dense layer)."""
    if item == "mtp":
        return f"model.layers.{cfg.num_hidden_layers}."
    stack, _, idx = item.partition(".")
    return f"model.layers.{int(idx) + (cfg.first_k_dense_replace if stack == 'moe_layers' else 0)}."


def _read_raw(r: _Reader, cfg: Config, infos: Params, item: str) -> dict:
    """One item's arrays (layered.item_names: globals, dense_layers.i, moe_layers.i, mtp) as nested dicts."""
    if item == "globals":
        return {"embed": r.get("model.embed_tokens.weight", infos.embed),
                "norm": r.get("model.norm.weight", infos.norm), "lm_head": r.get("lm_head.weight", infos.lm_head, _t)}
    pre = item_prefix(cfg, item)
    if item == "mtp":
        m = infos.mtp
        # the release stores the shared embedding and head again in the MTP layer: the same tensors, not read twice
        r.used |= {pre + "embed_tokens.weight", pre + "shared_head.head.weight"}
        return {"enorm": r.get(pre + "enorm.weight", m.enorm), "hnorm": r.get(pre + "hnorm.weight", m.hnorm),
                "eh_proj": r.get(pre + "eh_proj.weight", m.eh_proj, _t),
                "layer": _layer_arrays(r, pre, cfg, m.layer), "norm": r.get(pre + "shared_head.norm.weight", m.norm)}
    stack = item.partition(".")[0]
    return _layer_arrays(r, pre, cfg, unstacked(getattr(infos, stack)))


def _build(raw: dict, item: str):
    if item == "globals":
        return raw
    if item == "mtp":
        return Mtp(**{**raw, "layer": _build_layer(raw["layer"], True)})
    return _build_layer(raw, item.startswith("moe_layers"))


def _raise_problems(r: _Reader, tensors, cfg: Config, *, strict: bool, with_mtp: bool) -> None:
    problems = []
    for kind, items in (("missing", r.missing), ("misshapen", r.misshapen), ("mistyped", r.mistyped),
                        ("non-finite", r.nonfinite)):
        if items:
            problems.append(f"{len(items)} {kind} tensor(s): " + "; ".join(items[:10])
                            + (" ..." if len(items) > 10 else ""))
    if strict:
        mtp_prefix = item_prefix(cfg, "mtp")
        extra = sorted(k for k in tensors if k not in r.used and not (not with_mtp and k.startswith(mtp_prefix)))
        if extra:
            problems.append(f"{len(extra)} unexpected tensor(s): " + ", ".join(extra[:10]))
    if problems:
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(problems))


def check_tensors(tensors: Mapping[str, np.ndarray], cfg: Config, *, with_mtp: bool = False,
                  strict: bool = True) -> None:
    """Every tensor's presence, shape and dtype against the config, from the shard headers alone (nothing is read:
    stand-ins of no memory go through the same mapping), raising one CheckpointError that names them all."""
    r = _Reader(tensors, cfg, dry=True)
    infos = param_infos(cfg, with_mtp=with_mtp)
    for item in item_names(cfg, with_mtp):
        _read_raw(r, cfg, infos, item)
    _raise_problems(r, tensors, cfg, strict=strict, with_mtp=with_mtp)


def _on_host(tree, infos):
    """Plain arrays in their declared dtype (numpy), QArrays as read."""
    def one(info, a):
        if a is None or isinstance(a, QArray):
            return a
        return np.asarray(a).astype(info.dtype)
    return jax.tree.map(one, infos, tree, is_leaf=is_info)


def read_item(tensors: Mapping[str, np.ndarray], cfg: Config, item: str, *, fp8_activations: bool = True,
              check_finite: bool = False):
    """One item of a conversion, read and built on the host: {'embed', 'norm', 'lm_head'} for "globals", a Layer
    for "dense_layers.i" / "moe_layers.i", an Mtp for "mtp". Presence and shapes are check_tensors' job (run it
    first); this raises what reading finds (non-finite values with check_finite)."""
    r = _Reader(tensors, cfg, fp8_activations=fp8_activations, check_finite=check_finite)
    infos = param_infos(cfg, with_mtp=item == "mtp")
    tree = _build(_read_raw(r, cfg, infos, item), item)
    _raise_problems(r, tensors, cfg, strict=False, with_mtp=item == "mtp")
    if item == "globals":
        return {k: np.asarray(v).astype(getattr(infos, k).dtype) for k, v in tree.items()}
    info = infos.mtp if item == "mtp" else unstacked(getattr(infos, item.partition(".")[0]))
    return _on_host(tree, info)


def params_from_tensors(tensors: Mapping[str, np.ndarray], cfg: Config, *, with_mtp: bool = False,
                        strict: bool = True, fp8_activations: bool = True, check_finite: bool = False) -> Params:
    """Map a flat {checkpoint name: array} mapping onto `Params`, checking every tensor against the config.

    Raises CheckpointError naming each missing tensor, each shape that disagrees with the config, each tensor of a
    dtype the release never uses there, each non-finite one (check_finite) and (strict) every tensor the config has
    no place for. FP8 weights with their `weight_scale_inv` become QArrays (see the module docstring).
    """
    r = _Reader(tensors, cfg, fp8_activations=fp8_activations, check_finite=check_finite)
    infos = param_infos(cfg, with_mtp=with_mtp)
    items = item_names(cfg, with_mtp)
    built = {item: _build(_read_raw(r, cfg, infos, item), item) for item in items}
    _raise_problems(r, tensors, cfg, strict=strict, with_mtp=with_mtp)
    dense = [built[i] for i in items if i.startswith("dense_layers")]
    moe = [built[i] for i in items if i.startswith("moe_layers")]
    g = built["globals"]
    params = Params(embed=g["embed"], dense_layers=_stack_layers(dense) if dense else None,
                    moe_layers=_stack_layers(moe) if moe else None, norm=g["norm"], lm_head=g["lm_head"],
                    mtp=built.get("mtp"))

    def to_device(info, a):
        if a is None:
            return None
        if isinstance(a, QArray):
            return jax.tree.map(jnp.asarray, a)
        return jnp.asarray(a, info.dtype)
    return jax.tree.map(to_device, infos, params, is_leaf=is_info)


# ---- the other way: our parameters in the release's names and layouts ----------------------------------------

def _attention_to_hf(a: Attention, cfg: Config) -> dict[str, np.ndarray]:
    """One layer's attention (float arrays in our layout) -> {suffix: [out, in] array}, names from the same table."""
    n, h, v, q, c = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.q_lora_rank,
                     cfg.kv_lora_rank)
    names = {field: suffix for field, (suffix, _, _) in _attention_map(cfg).items()}
    kv_b = np.concatenate([np.asarray(a.wk_b), np.swapaxes(np.asarray(a.wv_b), 1, 2)], axis=1)  # [N, H+V, C]
    return {names["wq_a"]: np.asarray(a.wq_a).T, names["q_norm"]: np.asarray(a.q_norm),
            names["wq_b"]: np.asarray(a.wq_b).reshape(q, -1).T, names["wkv_a"]: np.asarray(a.wkv_a).T,
            names["kv_norm"]: np.asarray(a.kv_norm), names["wk_b"]: kv_b.reshape(n * (h + v), c),
            names["wo"]: np.asarray(a.wo).reshape(n * v, -1).T}


def _layer_to_hf(layer: Layer, prefix: str, cfg: Config) -> dict[str, np.ndarray]:
    out = {prefix + "input_layernorm.weight": np.asarray(layer.attn_norm),
           prefix + "post_attention_layernorm.weight": np.asarray(layer.ffn_norm)}
    out.update({prefix + k: w for k, w in _attention_to_hf(layer.attn, cfg).items()})
    f = layer.ffn
    if isinstance(f, Moe):
        out[prefix + "mlp.gate.weight"] = np.asarray(f.w_router).T
        out[prefix + "mlp.gate.e_score_correction_bias"] = np.asarray(f.e_bias)
        for k, suffix in _MLP.items():
            out[prefix + "mlp.shared_experts." + suffix] = np.asarray(getattr(f.shared, k)).T
            stack = np.asarray(getattr(f, "we" + k[1]))
            for e in range(stack.shape[0]):
                out[f"{prefix}mlp.experts.{e}.{suffix}"] = stack[e].T
    else:
        out.update({prefix + "mlp." + suffix: np.asarray(getattr(f, k)).T for k, suffix in _MLP.items()})
    return out


def hf_tensors(params: Params, cfg: Config) -> dict[str, np.ndarray]:
    """Plain (unquantized) parameters as the HF / DeepSeek release names and lays them out ([out, in] linears,
    kv_b_proj joined per head, MTP at layer index num_hidden_layers with its copies of the embedding and head)."""
    out = {"model.embed_tokens.weight": np.asarray(params.embed), "model.norm.weight": np.asarray(params.norm),
           "lm_head.weight": np.asarray(params.lm_head).T}
    n_dense = cfg.first_k_dense_replace
    for stack, lo in ((params.dense_layers, 0), (params.moe_layers, n_dense)):
        if stack is None:
            continue
        for j in range(stack.attn_norm.shape[0]):
            out.update(_layer_to_hf(jax.tree.map(lambda a, j=j: a[j], stack), f"model.layers.{lo + j}.", cfg))
    if params.mtp is not None:
        pre, m = f"model.layers.{cfg.num_hidden_layers}.", params.mtp
        out.update({pre + "enorm.weight": np.asarray(m.enorm), pre + "hnorm.weight": np.asarray(m.hnorm),
                    pre + "eh_proj.weight": np.asarray(m.eh_proj).T,
                    pre + "shared_head.norm.weight": np.asarray(m.norm),
                    pre + "embed_tokens.weight": out["model.embed_tokens.weight"],
                    pre + "shared_head.head.weight": out["lm_head.weight"]})
        out.update(_layer_to_hf(m.layer, pre, cfg))
    return out


def host_memory_available() -> int:
    """Bytes of host memory available now (MemAvailable), or 0 where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load_bytes(tensors: TensorDirectory, cfg: Config) -> int:
    """Host bytes `load_hf_checkpoint` holds at its peak: every tensor as kept (FP8 codes and scales as stored,
    the rest in the compute dtype) twice, the stacked numpy copy and the JAX array made from it (the shards
    themselves are memory-mapped: page cache, not counted)."""
    itemsize = np.dtype(cfg.param_dtype).itemsize
    total = 0
    for name in tensors:
        dtype = tensors.dtype(name)
        if dtype == FP8 or name.endswith("_scale_inv"):
            total += tensors.nbytes(name)
        else:
            total += math.prod(tensors.shape(name)) * (itemsize if np.issubdtype(dtype, np.floating) else 4)
    return 2 * total


def _check_quantization_config(q: dict | None, where: Path) -> None:
    """The release's quantization_config is the one layout this loader reads FP8 in: E4M3, 128x128 blocks."""
    if q is None:
        return
    want = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    wrong = {k: q.get(k) for k, v in want.items() if k in q and q[k] != v}
    if wrong:
        raise CheckpointError(f"{where}: quantization_config {wrong} is not DeepSeek's FP8 release layout {want}")


def open_hf_directory(path: str | Path, cfg: Config | None = None, *,
                      dtype: str | None = None) -> tuple[TensorDirectory, Config]:
    """(the tensors by name, headers read; the config) of an HF-layout directory, its quantization_config checked."""
    path = Path(path)
    require_directory(path)
    raw = None
    if (path / "config.json").exists():
        try:
            raw = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path / 'config.json'}: not JSON ({e})") from None
        _check_quantization_config(raw.get("quantization_config"), path / "config.json")
    if cfg is None:
        if raw is None:
            raise CheckpointError(f"{path} has no config.json; pass cfg= explicitly")
        try:
            cfg = Config.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path / 'config.json'}: not a DeepSeek-V3 config ({e})") from None
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    return TensorDirectory(path), cfg


def load_hf_checkpoint(path: str | Path, cfg: Config | None = None, *, dtype: str | None = None,
                       with_mtp: bool | None = None, fp8_activations: bool = True, check_finite: bool | None = None,
                       max_host_bytes: int | None = None, strict: bool = True) -> tuple[Params, Config]:
    """Load a directory holding config.json and *.safetensors (one shard, or many with their index), the FP8
    release as it is (see the module docstring).

    dtype: the compute dtype ("bfloat16", "float32"; default the config's torch_dtype); with_mtp: load the MTP
    module (default: when the config has one and the checkpoint holds it); check_finite: refuse a tensor holding
    NaN or inf, naming it (default: on for checkpoints under 2 GB); max_host_bytes: refuse, before reading any
    tensor, when `load_bytes` exceeds it (default: the host memory available now). Every tensor's name, shape and
    dtype is checked from the headers first (`check_tensors`). Returns (params, config).
    """
    path = Path(path)
    tensors, cfg = open_hf_directory(path, cfg, dtype=dtype)
    if with_mtp is None:
        with_mtp = cfg.num_nextn_predict_layers > 0 and any(
            k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in tensors)
    check_tensors(tensors, cfg, with_mtp=with_mtp, strict=strict)
    need = load_bytes(tensors, cfg)
    limit = host_memory_available() if max_host_bytes is None else max_host_bytes
    log.info(f"{path}: loading holds about {need / 1e9:.2f} GB of host memory ({limit / 1e9:.1f} GB available)")
    if limit and need > limit:
        raise CheckpointError(f"{path}: loading needs about {need / 1e9:.1f} GB of host memory (the weights as kept, "
                              f"twice: stacked, then as arrays) and {limit / 1e9:.1f} GB is available; load it on a "
                              f"larger host, or convert it (scripts/convert.py) and restore it straight onto a mesh")
    if check_finite is None:
        check_finite = sum(tensors.nbytes(k) for k in tensors) < 2e9
    params = params_from_tensors(tensors, cfg, with_mtp=with_mtp, strict=strict, fp8_activations=fp8_activations,
                                 check_finite=check_finite)
    return params, cfg
