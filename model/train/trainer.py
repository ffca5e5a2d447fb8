"""The training loop behind scripts/train.py: data, steps, a progress line, and the saved checkpoint."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np

from model.config import Config
from model.io.checkpoint import load_checkpoint, save_checkpoint
from model.io.hf_checkpoint import CheckpointError
from model.io.tokenizer import ByteTokenizer
from model.params import init
from model.train.data import TRAIN_MIX, Batcher, stdlib_corpus
from model.train.training import TrainConfig, make_optimizer, step_settings, train_step


def train(cfg: Config, tc: TrainConfig, out: Path | None, *, overwrite: bool = False, log=sys.stdout,
          log_every: int = 10):
    """Train from a random init, or from the checkpoint `tc.init_from` (its config must equal `cfg`; the optimizer
    starts afresh). Returns (params, history). Saves to `out` unless it is None."""
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")  # before any work
    parent = None
    if tc.init_from:
        params, ckpt_cfg, parent = load_checkpoint(tc.init_from)
        if ckpt_cfg != cfg:
            diff = {f.name: (getattr(ckpt_cfg, f.name), getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                    if getattr(ckpt_cfg, f.name) != getattr(cfg, f.name)}
            raise CheckpointError(f"--init-from {tc.init_from}: its config differs from the one to train "
                                  f"(field: (checkpoint, requested)): {diff}")
        if params.mtp is None and cfg.num_nextn_predict_layers:
            raise CheckpointError(f"--init-from {tc.init_from} has no MTP module but the config asks for one")
    tok = ByteTokenizer(cfg.vocab_size)
    corpus = stdlib_corpus()
    batcher = Batcher(corpus, tok, tc.seq_len, tc.batch, tc.seed, tc.text_frac, tc.answer_weight)
    if parent is None:
        params = init(cfg, jax.random.key(tc.seed), std="fan_in")
    step_tc = step_settings(tc)
    opt = make_optimizer(step_tc)
    opt_state = opt.init(params)
    history = []
    t0 = time.perf_counter()
    tokens_seen = 0
    for step in range(1, tc.steps + 1):
        tokens, segments, weights = batcher.next_batch()
        params, opt_state, m = train_step(params, opt_state, tokens, cfg=cfg, tc=step_tc, opt=opt,
                                          segments=segments if tc.pack_documents else None, weights=weights)
        tokens_seen += tokens.size - tokens.shape[0]
        if step % log_every == 0 or step == tc.steps or step == 1:
            m = jax.tree.map(np.asarray, m)
            el = time.perf_counter() - t0
            rec = {"step": step, "loss": float(m["loss"]), "ce": float(m["ce"]),
                   "mtp_ce": float(m.get("mtp_ce", np.nan)), "imbalance": m["imbalance"].round(2).tolist(),
                   "tok_s": tokens_seen / el, "elapsed_s": el}
            history.append(rec)
            bar = "#" * int(30 * step / tc.steps)
            print(f"\r[{bar:<30}] {step}/{tc.steps} loss {rec['loss']:.3f} ce {rec['ce']:.3f} "
                  f"mtp {rec['mtp_ce']:.3f} {rec['tok_s']:.0f} tok/s max/mean load "
                  f"{' '.join(f'{x:.2f}' for x in rec['imbalance'])} "
                  f"{el:.0f}s", end="\n" if step % (log_every * 10) == 0 or step == tc.steps else "", file=log,
                  flush=True)
    if out is not None:
        meta = {"steps": tc.steps, "train_config": dataclasses.asdict(tc), "arithmetic_mix": TRAIN_MIX,
                "data": corpus.source,
                "data_sha256": corpus.sha256, "final": history[-1], "jax": jax.__version__}
        if parent is not None:  # the whole lineage: what the starting checkpoint was trained with
            meta["init_from"] = {"path": str(tc.init_from), "training": parent.get("training")}
        save_checkpoint(out, params, cfg, tokenizer=tok.describe(), training=meta, overwrite=overwrite)
        print(f"saved {out}", file=log)
    return params, history
