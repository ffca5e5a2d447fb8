"""Converted checkpoints (format 2): one orbax item per layer, so a model of any size is written one layer at a
time and restored straight onto a mesh with each device reading only its part.

Layout of DIR:
    params/globals/          embed, norm, lm_head
    params/dense_layers.000/ ...  one item per dense layer, then params/moe_layers.000/ ... and params/mtp/
    meta.json                format 2, the config, the tokenizer, the quantization of every quantized leaf
                             (QArray's static fields: format, reduction axis, activation format ...), the recipes
                             the weights went through, the source
    manifest.json            sha256 of every file, verified on load (verify=False skips it)
Each item is a flat {leaf path: array} dict (".attn.wq_a.codes"), the layer's slice of the stacked parameters.

Restoring builds the target tree from the config and meta.json (shapes, dtypes, quantization) and checks every
saved array against it before reading any. On a mesh each stack is allocated sharded, and each layer is restored
with its own slice of the stack's shardings and written in place by a donated update, so device memory peaks at
the model plus one layer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from model.config import Config
from model.io.errors import CheckpointError
from model.params import Params, abstract_params
from model.placement import check_divisible, padded_vocab, param_specs, shard_params
from quant.qarray import QArray, is_qarray
from sharding.rules import ShardingRules, shardings_by_specs

FORMAT = 2
STACKS = ("dense_layers", "moe_layers")
GLOBALS = ("embed", "norm", "lm_head")
QARRAY_STATIC = ("fmt", "k_axis", "n_out", "act", "dtype", "mx_rule", "k_dims")


# ---- structure: items, leaf paths, the target tree --------------------------------------------------------------

def item_names(cfg: Config, with_mtp: bool) -> list[str]:
    """globals, dense_layers.000 ..., moe_layers.000 ..., mtp: the order a conversion writes them in."""
    n_dense = cfg.first_k_dense_replace
    names = ["globals", *[f"dense_layers.{i:03d}" for i in range(n_dense)],
             *[f"moe_layers.{i:03d}" for i in range(cfg.num_hidden_layers - n_dense)]]
    return names + (["mtp"] if with_mtp else [])


def _item_of(key: str) -> tuple[str, str]:
    """A full leaf path '.moe_layers.attn.wq_a.codes' -> (its stack or item, the path inside it)."""
    head, _, rest = key[1:].partition(".")
    if head in GLOBALS:
        return "globals", head
    return head, rest


def flat_leaves(tree) -> dict[str, object]:
    """{'.moe_layers.attn.wq_a.codes': array, ...}: every array of a Params tree, QArray fields included."""
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def quantization_of(params: Params) -> dict[str, dict]:
    """{leaf path: QArray static fields} of every quantized weight, as meta.json records it."""
    out = {}
    for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]:
        if is_qarray(x):
            d = {k: getattr(x, k) for k in QARRAY_STATIC}
            d["k_dims"] = list(d["k_dims"])
            d["fields"] = {f: [list(getattr(x, f).shape), np.dtype(getattr(x, f).dtype).name]
                           for f in ("codes", "scales", "tensor_scale", "input_scale") if getattr(x, f) is not None}
            out[jax.tree_util.keystr(p)] = d
    return out


def target_tree(cfg: Config, with_mtp: bool, quantized: dict[str, dict]) -> Params:
    """The abstract Params (ShapeDtypeStruct leaves) a checkpoint holds: the config's declarations, with the
    quantized weights' QArrays as meta.json describes them."""
    problems = []

    def leaf(path, sds):
        q = quantized.get(jax.tree_util.keystr(path))
        if q is None:
            return sds
        fields = {f: jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d)) for f, (s, d) in q["fields"].items()}
        w = QArray(**fields, **{k: (tuple(q[k]) if k == "k_dims" else q[k]) for k in QARRAY_STATIC})
        if w.shape != sds.shape:
            problems.append(f"{jax.tree_util.keystr(path)} is quantized as {w.shape}, the config declares {sds.shape}")
        return w
    target = jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg, with_mtp=with_mtp))
    if problems:
        raise CheckpointError("meta.json's quantized weights do not fit its config: " + "; ".join(problems[:8]))
    unknown = set(quantized) - {jax.tree_util.keystr(p) for p, _ in
                                jax.tree_util.tree_flatten_with_path(target, is_leaf=is_qarray)[0]}
    if unknown:
        raise CheckpointError(f"meta.json describes quantized weights the config has no place for: {sorted(unknown)}")
    return target


def item_arrays(params: Params, item: str) -> dict[str, object]:
    """The flat {path in item: array} an item saves: a stack's layer i is the slice [i] of every stacked array."""
    stack, _, idx = item.partition(".")
    out = {}
    for key, x in flat_leaves(params).items():
        owner, inner = _item_of(key)
        if owner == stack:
            out[inner] = x[int(idx)] if idx else x
    return out


# ---- hashes -------------------------------------------------------------------------------------------------------

def hash_files(root: Path, under: str = "") -> dict[str, str]:
    """{path relative to root: sha256} of the files below root/under (manifest.json and progress files aside)."""
    out = {}
    base = root / under if under else root
    for f in sorted(base.rglob("*")):
        if f.is_file() and f.name not in ("manifest.json", "progress.json"):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            out[f.relative_to(root).as_posix()] = h.hexdigest()
    return out


# ---- writing ------------------------------------------------------------------------------------------------------

def save_item(root: Path, item: str, arrays: dict[str, object]) -> dict[str, str]:
    """Write one item to root/params/<item> (through <item>.partial and a rename, so an item directory is
    always complete) and return its files' hashes."""
    final = root / "params" / item
    tmp = root / "params" / f"{item}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp.resolve(), arrays)
    ckptr.wait_until_finished()
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return hash_files(root, f"params/{item}")


def meta_dict(cfg: Config, params_or_quantized, *, with_mtp: bool, tokenizer: dict | None, recipes: list[str],
              source: dict | None = None, training: dict | None = None) -> dict:
    quantized = (params_or_quantized if isinstance(params_or_quantized, dict)
                 else quantization_of(params_or_quantized))
    return {"format": FORMAT, "config": cfg.to_dict(), "with_mtp": with_mtp, "items": item_names(cfg, with_mtp),
            "tokenizer": tokenizer, "recipes": recipes, "quantized": quantized, "source": source,
            "training": training}


def finalize(partial_dir: Path, final: Path, meta: dict, hashes: dict[str, str], *, overwrite: bool) -> Path:
    """meta.json and manifest.json into the finished directory, then the rename that makes it a checkpoint."""
    (partial_dir / "meta.json").write_text(json.dumps(meta, indent=2, default=float) + "\n")
    hashes["meta.json"] = hashlib.sha256((partial_dir / "meta.json").read_bytes()).hexdigest()
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        if (partial_dir / extra).is_file():
            hashes[extra] = hashlib.sha256((partial_dir / extra).read_bytes()).hexdigest()
    (partial_dir / "manifest.json").write_text(json.dumps(dict(sorted(hashes.items())), indent=2) + "\n")
    (partial_dir / "progress.json").unlink(missing_ok=True)
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(final)
    partial_dir.rename(final)
    return final


def save_layered(path: str | Path, params: Params, cfg: Config, *, tokenizer: dict | None = None,
                 recipes: list[str] | None = None, overwrite: bool = False) -> Path:
    """Write params (host or sharded arrays) as a format-2 checkpoint, one item per layer."""
    path = Path(path).resolve()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tmp = path.parent / f"{path.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "params").mkdir(parents=True)
    with_mtp = params.mtp is not None
    hashes: dict[str, str] = {}
    for item in item_names(cfg, with_mtp):
        hashes.update(save_item(tmp, item, item_arrays(params, item)))
    meta = meta_dict(cfg, params, with_mtp=with_mtp, tokenizer=tokenizer, recipes=recipes or [])
    return finalize(tmp, path, meta, hashes, overwrite=overwrite)


# ---- reading ------------------------------------------------------------------------------------------------------

def _saved_arrays(root: Path, item: str) -> dict[str, jax.ShapeDtypeStruct]:
    path = (root / "params" / item).resolve()
    if not path.is_dir():
        raise CheckpointError(f"{root}: item params/{item} is missing (incomplete checkpoint)")
    try:
        meta = ocp.StandardCheckpointer().metadata(path)
    except Exception as e:  # orbax raises many kinds; we say which item and why
        raise CheckpointError(f"{path}: unreadable orbax item ({type(e).__name__}: {e})") from None
    meta = getattr(meta, "item_metadata", meta)
    return {k: jax.ShapeDtypeStruct(tuple(v.shape), np.dtype(v.dtype)) for k, v in dict(meta).items()}


def check_items(root: Path, target: Params, items: list[str]) -> None:
    """Every item's saved arrays against the target's shapes and dtypes (metadata only: nothing is read)."""
    want: dict[str, dict[str, jax.ShapeDtypeStruct]] = {item: {} for item in items}
    for key, sds in flat_leaves(target).items():
        owner, inner = _item_of(key)
        for item in items:
            if item.partition(".")[0] == owner:
                shape = sds.shape[1:] if owner in STACKS else sds.shape
                want[item][inner] = jax.ShapeDtypeStruct(shape, sds.dtype)
    problems = []
    for item in items:
        have = _saved_arrays(root, item)
        for k, sds in want[item].items():
            got = have.get(k)
            if got is None:
                problems.append(f"{item}: {k} missing")
            elif got.shape != sds.shape or got.dtype != sds.dtype:
                problems.append(f"{item}: {k} saved {got.shape} {got.dtype.name}, expected {sds.shape} "
                                f"{np.dtype(sds.dtype).name}")
        extra = sorted(set(have) - set(want[item]))
        if extra:
            problems.append(f"{item}: unexpected {', '.join(extra[:5])}")
    if problems:
        raise CheckpointError(f"{root}: the saved arrays do not fit the config and quantization in meta.json: "
                              + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))


def _restore(root: Path, item: str, target: dict[str, jax.ShapeDtypeStruct]) -> dict:
    return ocp.StandardCheckpointer().restore((root / "params" / item).resolve(), target)


def _drop_lead(s):
    return NamedSharding(s.mesh, P(*tuple(s.spec)[1:])) if isinstance(s, NamedSharding) else s


@partial(jax.jit, donate_argnums=0)
def _put_layer(stack: dict, layer: dict, i):
    return {k: lax.dynamic_update_index_in_dim(stack[k], layer[k], i, 0) for k in stack}


def restore(root: Path, cfg: Config, meta: dict, *, mesh=None, rules: ShardingRules = ShardingRules()) -> Params:
    """The parameters of a format-2 checkpoint, on one device (mesh=None) or placed on a mesh."""
    with_mtp = meta["with_mtp"]
    target = target_tree(cfg, with_mtp, meta.get("quantized") or {})
    check_items(root, target, meta["items"])
    flat_target = flat_leaves(target)
    shardings = None
    pad = False
    if mesh is not None:
        check_divisible(cfg, mesh, rules)
        pad = padded_vocab(cfg, mesh, rules) != cfg.vocab_size
        shardings = flat_leaves(shardings_by_specs(target, param_specs(cfg, rules, with_mtp=with_mtp), mesh))

    def sharding_of(key):
        return None if shardings is None else shardings[key]

    def sds(shape, dtype, sharding):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) if sharding is not None else \
            jax.ShapeDtypeStruct(shape, dtype)

    out: dict[str, jax.Array] = {}
    for stack in (*STACKS, "globals", "mtp"):
        keys = [k for k in flat_target if _item_of(k)[0] == stack]
        if not keys:
            continue
        if stack in STACKS:
            items = [it for it in meta["items"] if it.partition(".")[0] == stack]
            full = {k: flat_target[k] for k in keys}
            if shardings is not None:
                buf = jax.jit(lambda full=full: {k: jnp.zeros(v.shape, v.dtype) for k, v in full.items()},
                              out_shardings={k: shardings[k] for k in keys})()
            else:
                buf = {k: jnp.zeros(v.shape, v.dtype) for k, v in full.items()}
            for i, item in enumerate(items):
                t = {_item_of(k)[1]: sds(full[k].shape[1:], full[k].dtype, _drop_lead(sharding_of(k)) if shardings
                                         else None) for k in keys}
                layer = _restore(root, item, t)
                buf = _put_layer(buf, {k: layer[_item_of(k)[1]] for k in keys}, i)
            out.update(buf)
        else:
            plain = shardings is None or (stack == "globals" and pad)
            t = {_item_of(k)[1]: sds(flat_target[k].shape, flat_target[k].dtype,
                                     None if plain else sharding_of(k)) for k in keys}
            got = _restore(root, stack, t)
            out.update({k: got[_item_of(k)[1]] for k in keys})
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    params = treedef.unflatten([out[jax.tree_util.keystr(p)] for p, _ in leaves])
    if mesh is not None and pad:  # the vocabulary padded to what the mesh divides: the globals placed here
        params = shard_params(params, cfg, mesh, rules)
    return params
