"""Convert the DeepSeek FP8 release (or any HF-layout DeepSeek-V3 directory) into this project's layered checkpoint
(model/io/layered.py), one layer at a time.

    convert("/data/DeepSeek-R1", "/data/r1-fp8")                     # the release's own FP8 codes and scales
    convert("/data/DeepSeek-R1", "/data/r1-fp4", weights="r1_fp4")   # R1-FP4, quantized from the FP8 blocks

Order of work: the config, then every tensor's name, shape and dtype from the shard headers (nothing read), so a
damaged release fails at once and names every problem; then each item (globals, each layer, MTP) is read from the
memory-mapped shards, checked for NaN/inf, re-quantized if asked, written as its own orbax item and dropped.

Memory: the host holds one item at a time: its source bytes (memory-mapped pages, released with the item), the
converted arrays until written, and for a re-quantization the float32 working copies of 8 experts at a time. The
stated bound: peak RSS <= JAX's own (about 0.2 GB) + 3 x the largest item's source bytes, whatever the number of
layers. Measured (docs/benchmarks.md; checkpoints of 4 and 8 layers, 2.28 and 3.95 GB, largest item 0.70 GB):
1.80 and 1.87 GB for FP8, 2.20 and 2.03 GB re-quantizing to R1-FP4, against a bound of 2.31 GB: the peak follows
the item, not the model. For DeepSeek-R1, whose MoE layer is 11.4 GB of FP8, the bound is about 35 GB.

Resuming: DST.partial holds the items written so far and progress.json (the options, a fingerprint of the source,
the hashes of every finished item). Run the same command again and it continues after the last finished item; an
item cut off half-way is written again. The result is identical to an uninterrupted run. Only the last step
(meta.json, manifest.json, the rename of DST.partial to DST) makes DST, so a directory named DST is always
complete. An existing DST is replaced only with overwrite=True.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

from model.config import Config
from model.io import layered
from model.io.errors import CheckpointError
from model.io.hf_checkpoint import check_tensors, item_prefix, open_hf_directory, read_item
from model.io.hf_tokenizer import TokenizerError
from model.io.tokenizer import tokenizer_for
from model.params import Layer, Moe, Params, param_infos, unstacked
from model.quantize import dequantize_all, quantize_tree

# --weights: what becomes of the release's FP8 linears (the recipe applied after loading them as they are)
WEIGHTS = {"fp8": None, "bf16": "dequantize", "nvfp4": "nvfp4_w4a16", "r1_fp4": "r1_fp4"}


def fingerprint(src: Path, tensors) -> str:
    """A hash of the source's config.json and every shard's name, size and header (nothing else is read)."""
    h = hashlib.sha256((src / "config.json").read_bytes() if (src / "config.json").exists() else b"")
    for f in sorted({sf.path for sf in tensors.where.values()}):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(n))
    return h.hexdigest()


class Progress:
    """A one-line progress bar over tensors and bytes (redrawn in place on a terminal, a line per item else)."""

    def __init__(self, n_tensors: int, n_bytes: int, stream=sys.stderr):
        self.n_tensors, self.n_bytes, self.stream = n_tensors, n_bytes, stream
        self.tensors = self.bytes = 0
        self.t0 = time.perf_counter()
        self.skipped = 0
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def skip(self, tensors: int, nbytes: int) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        self.skipped += nbytes

    def update(self, tensors: int, nbytes: int, item: str) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        dt = time.perf_counter() - self.t0
        rate = (self.bytes - self.skipped) / dt if dt > 0 else 0.0
        left = (self.n_bytes - self.bytes) / rate if rate > 0 else float("nan")
        frac = self.bytes / self.n_bytes if self.n_bytes else 1.0
        bar = "#" * int(frac * 24)
        line = (f"convert [{bar:<24}] {frac:6.1%}  tensors {self.tensors}/{self.n_tensors}  "
                f"{_size(self.bytes)}/{_size(self.n_bytes)}  {rate / 1e6:.0f} MB/s  ETA {left:.0f} s  {item}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _item_sources(tensors, cfg: Config, item: str) -> list[str]:
    """The source tensor names an item reads (its layer's prefix; the globals are the rest outside any layer)."""
    if item == "globals":
        return [k for k in tensors if not k.startswith("model.layers.")]
    prefix = item_prefix(cfg, item)
    return [k for k in tensors if k.startswith(prefix)]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _transform(tree, infos, weights: str, expert_chunk: int = 8):
    """The item's weights as --weights asks: as loaded (fp8), dequantized (bf16), or re-quantized by a recipe."""
    how = WEIGHTS[weights]
    if how is None:
        return tree
    if how == "dequantize":
        return dequantize_all(tree)
    if not isinstance(tree, Layer) or not isinstance(tree.ffn, Moe):
        return quantize_tree(tree, infos, how)
    # A MoE layer: the routed experts expert_chunk at a time, so the quantizer's float32 working copies are of a
    # few experts, not of the layer. Every scale is per expert, so the result is the whole stack's.
    none = {"we1": None, "we2": None, "we3": None}
    out = quantize_tree(tree.replace(ffn=tree.ffn.replace(**none)), infos.replace(ffn=infos.ffn.replace(**none)), how)
    only = Moe(w_router=None, e_bias=None, shared=None, **{k: getattr(infos.ffn, k) for k in none})
    n = tree.ffn.we1.shape[0]
    parts = []
    for e in range(0, n, expert_chunk):
        chunk = Moe(w_router=None, e_bias=None, shared=None,
                    **{k: jax.tree.map(lambda a, e=e: a[e:e + expert_chunk], getattr(tree.ffn, k)) for k in none})
        parts.append(jax.tree.map(np.asarray, quantize_tree(chunk, only, how)))
    experts = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    return out.replace(ffn=out.ffn.replace(**{k: getattr(experts, k) for k in none}))


def _full_quantization(tree, item: str, cfg: Config) -> dict[str, dict]:
    """The item's quantized weights as meta.json records them: full paths, stacked shapes."""
    stack = item.partition(".")[0]
    n = {"dense_layers": cfg.first_k_dense_replace,
         "moe_layers": cfg.num_hidden_layers - cfg.first_k_dense_replace}.get(stack)
    out = {}
    for key, q in layered.quantization_of(tree).items():
        if stack in layered.STACKS:
            key = f".{stack}{key}"
            q = {**q, "fields": {f: [[n, *s], d] for f, (s, d) in q["fields"].items()}}
        elif stack == "mtp":
            key = f".mtp{key}"
        out[key] = q
    return out


def _item_tree(tensors, cfg: Config, item: str, with_mtp: bool, check_finite: bool):
    """(tree, declarations) of one item, its arrays on the host."""
    infos = param_infos(cfg, with_mtp=with_mtp)
    got = read_item(tensors, cfg, item, check_finite=check_finite)
    if item == "globals":
        return (Params(embed=got["embed"], dense_layers=None, moe_layers=None, norm=got["norm"],
                       lm_head=got["lm_head"]),
                Params(embed=infos.embed, dense_layers=None, moe_layers=None, norm=infos.norm, lm_head=infos.lm_head))
    if item == "mtp":
        return got, infos.mtp
    stack = item.partition(".")[0]
    return got, unstacked(getattr(infos, stack))


def _arrays(tree) -> dict[str, np.ndarray]:
    """An item's flat {path in item: host array}, as layered.save_item writes it."""
    flat = layered.flat_leaves(tree)
    return {k.lstrip("."): np.asarray(v) for k, v in flat.items()}


def convert(src: str | Path, dst: str | Path, *, dtype: str | None = None, weights: str = "fp8",
            overwrite: bool = False, check_finite: bool = True, tokenizer: str = "auto", expert_chunk: int = 8,
            progress_stream=sys.stderr) -> Path:
    """Convert src (HF layout: config.json, *.safetensors [+ index]) into the layered checkpoint dst; see the
    module docstring. expert_chunk: routed experts re-quantized at a time (bounds the quantizer's working
    memory). Returns dst. Raises CheckpointError naming every problem of the source, FileExistsError for an
    existing dst without overwrite."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {sorted(WEIGHTS)}, got {weights!r}")
    src, dst = Path(src), Path(dst).resolve()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    tensors, cfg = open_hf_directory(src, dtype=dtype)
    with_mtp = cfg.num_nextn_predict_layers > 0 and any(
        k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in tensors)
    check_tensors(tensors, cfg, with_mtp=with_mtp)
    try:
        tok = tokenizer_for(tokenizer, cfg.vocab_size, src)
    except TokenizerError:
        if tokenizer != "auto":
            raise
        tok = None  # weights without a tokenizer: the converted checkpoint records none, and generation asks for one
    options = {"format": layered.FORMAT, "source": fingerprint(src, tensors), "dtype": cfg.dtype, "weights": weights,
               "with_mtp": with_mtp, "check_finite": check_finite}
    part = dst.parent / f"{dst.name}.partial"
    state = {"options": options, "done": {}, "quantized": {}}
    if part.exists():
        try:
            old = json.loads((part / "progress.json").read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and old.get("options") == options:
            state = old
        elif overwrite:
            shutil.rmtree(part)
        else:
            raise CheckpointError(f"{part} holds a conversion of another source or with other options; remove it "
                                  f"or pass --overwrite to start again")
    (part / "params").mkdir(parents=True, exist_ok=True)
    _write_json(part / "progress.json", state)

    items = layered.item_names(cfg, with_mtp)
    sources = {it: _item_sources(tensors, cfg, it) for it in items}
    bar = Progress(sum(map(len, sources.values())), sum(tensors.nbytes(k) for k in tensors), progress_stream)
    for item in items:
        n_bytes = sum(tensors.nbytes(k) for k in sources[item])
        if item in state["done"]:
            bar.skip(len(sources[item]), n_bytes)
            continue
        tree, infos = _item_tree(tensors, cfg, item, with_mtp, check_finite)
        tree = _transform(tree, infos, weights, expert_chunk)
        arrays = _arrays(tree)
        hashes = layered.save_item(part, item, arrays)
        state["done"][item] = hashes
        state["quantized"].update(_full_quantization(tree, item, cfg))
        _write_json(part / "progress.json", state)
        del tree, arrays
        bar.update(len(sources[item]), n_bytes, item)
    bar.close()

    for f in ("tokenizer.json", "tokenizer_config.json"):
        if tok is not None and tok.describe().get("kind") == "hf" and (src / f).is_file():
            shutil.copyfile(src / f, part / f)
    recipes = {"fp8": ["fp8_w8a8"], "bf16": [], "nvfp4": ["fp8_w8a8", "nvfp4_w4a16"],
               "r1_fp4": ["fp8_w8a8", "r1_fp4"]}[weights]
    meta = layered.meta_dict(cfg, state["quantized"], with_mtp=with_mtp, tokenizer=tok.describe() if tok else None,
                             recipes=recipes,
                             source={"path": str(src), "fingerprint": options["source"], "weights": weights})
    hashes = {k: v for d in state["done"].values() for k, v in d.items()}
    return layered.finalize(part, dst, meta, hashes, overwrite=overwrite)

