"""The FP8-vs-FP4 accuracy table on the bundled model: one row per precision, with held-out bits per byte,
arithmetic exact match, greedy-token agreement and mean KL to the BF16 model, and weight bytes.

The BF16 row has every weight rounded to BF16; the quantized rows quantize those BF16 weights (as NVIDIA derives its
FP4 checkpoint from the dequantized release). Activations are float32 in every row (XLA:CPU lacks batched BF16 dots
with float32 accumulation), so the rows differ by the weight and activation formats alone; W4A4/W8A8 rows
quantize the activations explicitly, as the low-precision matmul would. Agreement and KL are teacher-forced over the
held-out text and held-out arithmetic: at each position, whether the argmax token equals BF16's, and KL(BF16 || row).
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from model.config import Config
from model.forward import forward, lm_logits
from model.plan import ExecutionPlan
from model.quantize import calibrate, quantize_params
from model.train.data import KINDS, problems, stdlib_corpus
from model.train.evaluate import arithmetic_accuracy
from quant.recipes import get_recipe, weight_bytes

DEFAULT_ROWS = ("bf16", "fp8_w8a8", "nvfp4_w4a16", "nvfp4_w4a4", "mxfp4_w4a4", "nvfp4_search", "r1_fp4",
                "mxfp4_w4a16")
LABELS = {"bf16": "BF16", "fp8_w8a8": "FP8 W8A8", "nvfp4_w4a16": "NVFP4 W4A16", "nvfp4_w4a4": "NVFP4 W4A4",
          "mxfp4_w4a4": "MXFP4 W4A4", "mxfp4_w4a16": "MXFP4 W4A16", "nvfp4_search": "NVFP4 W4A16, scale search",
          "r1_fp4": "R1-FP4 recipe (W4A4, FP8 cache)"}


@partial(jax.jit, static_argnames=("cfg",))
def _logprobs(params, tokens, cfg):
    """log p(next token) at every position of tokens[:, :-1] ([B, T-1, V], float32)."""
    inp = tokens[:, :-1]
    b, t = inp.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, _, _ = forward(params, None, inp, pos, None, cfg, ExecutionPlan(), "prefill")  # grouped experts
    return jax.nn.log_softmax(lm_logits(params, hidden, cfg), -1)


def _rows(text: str, bos: int, chunk: int) -> np.ndarray:
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    n = len(data) // chunk
    return np.concatenate([np.full((n, 1), bos), data[:n * chunk].reshape(n, chunk)], 1).astype(np.int32)


def calibration_sequences(tok, n_text: int = 8, n_arith: int = 8, length: int = 127):
    """From the training splits only: text windows and arithmetic problems."""
    corpus = stdlib_corpus()
    step = max(len(corpus.train) // (n_text + 1), 1)
    seqs = [tok.encode(corpus.train[i * step:i * step + length], add_bos=True) for i in range(n_text)]
    seqs += [tok.encode(p.text(), add_bos=True) for p in problems(np.random.default_rng(31), n_arith, heldout=False)]
    return seqs


def eval_quant(params, cfg: Config, tok, *, rows=DEFAULT_ROWS, n_problems: int = 100, text_bytes: int = 30000,
               chunk: int = 256, batch: int = 8, log=print) -> dict:
    base_cfg = dataclasses.replace(cfg, dtype="float32")
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
                        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim > 1 else x.astype(jnp.float32), params)
    calib = calibrate(base, base_cfg, calibration_sequences(tok))
    corpus = stdlib_corpus()
    text_rows = _rows(corpus.heldout[:text_bytes], tok.bos_id, chunk)
    arith = "".join(p.text() for p in problems(np.random.default_rng(99), 200, heldout=True))
    arith_rows = _rows(arith, tok.bos_id, chunk)
    n_text = len(text_rows) - len(text_rows) % batch
    all_rows = np.concatenate([text_rows[:n_text], arith_rows[:len(arith_rows) - len(arith_rows) % batch]])
    ref_lp = None
    results = []
    for name in rows:
        t0 = time.perf_counter()
        r = get_recipe(name)
        qp = quantize_params(base, base_cfg, r, calib)
        kv = calib.kv if r.kv_fp8 else None
        nats, agree, kl, count = 0.0, 0, 0.0, 0
        first = ref_lp is None  # the first row is the reference of agreement and KL
        ref_lp = [] if first else ref_lp
        for j, i in enumerate(range(0, len(all_rows), batch)):
            toks = jnp.asarray(all_rows[i:i + batch])
            lp = _logprobs(qp, toks, cfg=base_cfg)
            if i < n_text:
                nats -= float(jnp.take_along_axis(lp, toks[:, 1:, None], -1).sum())
            if first:
                ref_lp.append(lp)
                continue
            agree += int(jnp.sum(lp.argmax(-1) == ref_lp[j].argmax(-1)))
            kl += float(jnp.sum(jnp.exp(ref_lp[j]) * (ref_lp[j] - lp)))
            count += lp.shape[0] * lp.shape[1]
        acc = arithmetic_accuracy(qp, base_cfg, tok, n_problems, kinds=KINDS, kv_scale=kv)
        row = {"recipe": name, "label": LABELS.get(name, name),
               "bits_per_byte": nats / math.log(2) / (n_text * chunk),
               "exact_match": acc, "greedy_agreement": agree / count if count else 1.0,
               "mean_kl": kl / count if count else 0.0, "weight_bytes": weight_bytes(qp, float_itemsize=2),
               "seconds": time.perf_counter() - t0}
        results.append(row)
        log(format_row(row))
    return {"rows": results, "heldout_text_bytes": n_text * chunk, "problems_per_kind": n_problems,
            "positions_compared": int(len(all_rows) * chunk), "activations": "float32",
            "weights": "rounded to bfloat16, then quantized per recipe"}


HEADER = (f"{'precision':34} {'bits/byte':>9} {'add2':>6} {'sub2':>6} {'add3':>6} {'mul':>6} {'agree':>7} "
          f"{'KL':>8} {'weights MB':>10}")


def format_row(r: dict) -> str:
    em = r["exact_match"]
    return (f"{r['label']:34} {r['bits_per_byte']:9.3f} " + " ".join(f"{em.get(k, float('nan')):6.1%}" for k in KINDS)
            + f" {r['greedy_agreement']:7.2%} {r['mean_kl']:8.4f} {r['weight_bytes'] / 1e6:10.2f}")


def format_table(res: dict) -> str:
    return "\n".join([HEADER, "-" * len(HEADER), *(format_row(r) for r in res["rows"])])


def plot(res: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install -e '.[plot]'") from None
    rows = res["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    labels = [r["label"] for r in rows]
    x = np.arange(len(rows))
    axes[0].bar(x, [r["bits_per_byte"] for r in rows])
    axes[0].set_ylabel("held-out bits per byte (lower is better)")
    lo = min(r["bits_per_byte"] for r in rows)
    axes[0].set_ylim(lo * 0.97, max(r["bits_per_byte"] for r in rows) * 1.01)
    for i, k in enumerate(KINDS):
        axes[1].bar(x + (i - 1.5) * 0.2, [r["exact_match"].get(k, 0) for r in rows], 0.2, label=k)
    axes[1].set_ylabel("arithmetic exact match")
    axes[1].legend(fontsize=7)
    axes[2].scatter([r["weight_bytes"] / 1e6 for r in rows], [r["mean_kl"] for r in rows])
    for r in rows:
        axes[2].annotate(r["label"], (r["weight_bytes"] / 1e6, r["mean_kl"]), fontsize=7)
    axes[2].set_xlabel("weight MB")
    axes[2].set_ylabel("mean KL to BF16")
    for ax in axes[:2]:
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
