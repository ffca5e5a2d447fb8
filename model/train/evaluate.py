"""Evaluation of a byte-level model: held-out bits per byte (against a unigram baseline), exact-match accuracy
on held-out arithmetic problems by kind, and the router's expert load on held-out text (max/mean per layer)."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from model.config import Config
from model.forward import forward, lm_logits
from model.generate import generate
from model.plan import ExecutionPlan
from model.train.data import KINDS, TextCorpus, problems, stdlib_corpus


@partial(jax.jit, static_argnames=("cfg",))
def _score(params, tokens, cfg):
    """Sum of -log p (nats) of tokens[:, 1:] given the prefix, and the per-layer expert load."""
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    b, t = inp.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, _, (load, _) = forward(params, None, inp, pos, None, cfg, ExecutionPlan(), "train")
    logp = jax.nn.log_softmax(lm_logits(params, hidden, cfg), -1)
    return -jnp.take_along_axis(logp, tgt[..., None], -1).sum(), load


def text_bits_per_byte(params, cfg: Config, tok, text: str, chunk: int = 256, batch: int = 8):
    """Bits per byte over `text`, in chunks of `chunk` bytes each preceded by <bos>; plus load [Lm, E]."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    n = len(data) // chunk
    rows = np.concatenate([np.full((n, 1), tok.bos_id), data[:n * chunk].reshape(n, chunk)], 1).astype(np.int32)
    nats, load = 0.0, 0.0
    for i in range(0, n - n % batch, batch):
        s, l = _score(params, jnp.asarray(rows[i:i + batch]), cfg=cfg)
        nats, load = nats + float(s), load + np.asarray(l)
    scored = (n - n % batch) * chunk
    if scored == 0:
        raise ValueError(f"text of {len(data)} bytes is shorter than one batch of {batch} chunks of {chunk} bytes "
                         f"({batch * chunk} bytes): nothing to score")
    return nats / math.log(2) / scored, load


def unigram_bits_per_byte(train: str, heldout: str) -> float:
    """Cross-entropy of held-out bytes under add-one-smoothed byte frequencies of the training text."""
    counts = np.bincount(np.frombuffer(train.encode("utf-8"), np.uint8), minlength=256) + 1.0
    p = counts / counts.sum()
    held = np.frombuffer(heldout.encode("utf-8"), np.uint8)
    return float(-np.log2(p[held]).mean())


def arithmetic_accuracy(params, cfg: Config, tok, n: int, seed: int = 1234, kinds=KINDS,
                        kv_scale=None) -> dict[str, float]:
    """Greedy exact match of the final answer on held-out problems, per kind (kv_scale: an FP8 latent cache)."""
    rng = np.random.default_rng(seed)
    newline = tok.encode("\n")[0]
    out = {}
    for kind in kinds:
        probs = problems(rng, n, heldout=True, kinds=(kind,))
        prompts = [tok.encode(p.prompt(), add_bos=True) for p in probs]
        res = generate(params, cfg, prompts, max_new_tokens=96, stop_tokens=[newline, tok.eos_id], kv_scale=kv_scale)
        correct = 0
        for p, ids in zip(probs, res.sequences()):
            text = tok.decode(ids)
            answer = text.split("=")[-1].strip() if "=" in text else ""
            correct += answer == str(p.answer)
        out[kind] = correct / n
    return out


def max_over_mean(load) -> list[float]:
    """Per layer: the busiest expert's load over the mean load (1.0 is perfectly balanced)."""
    load = np.asarray(load)
    return (load.max(-1) / load.mean(-1)).round(3).tolist()


def expert_load(params, cfg: Config, tok, *, text_bytes: int = 60000, n_problems: int = 400,
                corpus: TextCorpus | None = None) -> dict:
    """The router's load per MoE layer on held-out text, on held-out arithmetic, and on both: max/mean lists,
    plus the held-out text bits per byte computed on the way. corpus: the stdlib corpus, if already read."""
    held = (corpus or stdlib_corpus()).heldout[:text_bytes]
    bpb, load_text = text_bits_per_byte(params, cfg, tok, held)
    arith = "".join(p.text() for p in problems(np.random.default_rng(99), n_problems, heldout=True))
    _, load_arith = text_bits_per_byte(params, cfg, tok, arith)
    return {"bits_per_byte": bpb, "heldout_text_bytes": len(held.encode("utf-8")),
            "expert_load_max_over_mean": {"heldout_text": max_over_mean(load_text),
                                          "heldout_arithmetic": max_over_mean(load_arith),
                                          "both": max_over_mean(np.asarray(load_text) + np.asarray(load_arith))}}


MIN_TEXT_BYTES = 8 * 256  # one batch of chunks (text_bits_per_byte)


def evaluate(params, cfg: Config, tok, *, n_problems: int = 200, text_bytes: int = 60000) -> dict:
    """Held-out bits per byte (text_bytes of the held-out split, at least MIN_TEXT_BYTES), arithmetic exact match
    (n_problems per kind, at least 1) and the router's load."""
    for name, v, lo in (("n_problems", n_problems, 1), ("text_bytes", text_bytes, MIN_TEXT_BYTES)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    corpus = stdlib_corpus()
    loads = expert_load(params, cfg, tok, text_bytes=text_bytes, corpus=corpus)
    return {"heldout_text_bytes": loads["heldout_text_bytes"], "bits_per_byte": loads["bits_per_byte"],
            "unigram_bits_per_byte": unigram_bits_per_byte(corpus.train, corpus.heldout[:text_bytes]),
            "arithmetic_exact_match": arithmetic_accuracy(params, cfg, tok, n_problems),
            "problems_per_kind": n_problems,
            "expert_load_max_over_mean": loads["expert_load_max_over_mean"]}


def format_table(r: dict) -> str:
    lines = [f"{'metric':44} {'value':>10}", "-" * 55,
             f"{'held-out text, bits per byte (model)':44} {r['bits_per_byte']:10.3f}",
             f"{'held-out text, bits per byte (unigram)':44} {r['unigram_bits_per_byte']:10.3f}"]
    names = {"add2": "2-digit addition", "sub2": "2-digit subtraction", "add3": "3-digit addition",
             "mul": "1-digit x 2-digit multiplication"}
    for k, v in r["arithmetic_exact_match"].items():
        lines.append(f"{'exact match, ' + names.get(k, k):44} {v:10.1%}")
    for split, values in r["expert_load_max_over_mean"].items():
        lines.append(f"{'expert load max/mean per MoE layer, ' + split.replace('_', ' '):44} "
                     + " ".join(f"{v:.2f}" for v in values))
    return "\n".join(lines)
