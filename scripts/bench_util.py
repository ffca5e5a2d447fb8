"""Benchmark helpers for scripts/bench_decode.py and bench_sharding.py: our decode/prefill throughput, HF
transformers' on the same weights, the bytes a decode step must read, the machine's matrix-vector read bandwidth,
and idle cores polling for the run."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import struct
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from model.cache import init_cache
from model.config import Config
from model.forward import _prefill, decode_fn, prefill_fn
from model.io.hf_checkpoint import load_hf_checkpoint
from model.params import init, param_counts
from model.plan import ExecutionPlan
from model.sampling import greedy


def median_time(fn, repeats: int, between=None) -> float:
    """Median wall time of fn() over `repeats` calls after a warm-up; between(), if given, runs after each call
    (outside the timing)."""
    fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if between is not None:
            between()
    return statistics.median(times)


class MatvecBandwidth:
    """Bytes/s of y = W x for a float32 W of n x n (256 MiB at n = 8192): the read rate decode can hope for.

    The rate this machine reaches moves by 10-20% over minutes (other tenants, clocks), so a benchmark takes
    samples interleaved with its own timed runs (`sample()`), and compares medians taken over the same period."""

    def __init__(self, n: int = 8192):
        self.w = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        self.x = jnp.ones((n,), jnp.float32)
        self.f = jax.jit(lambda w, x: w @ x)
        self.f(self.w, self.x).block_until_ready()
        self.samples: list[float] = []

    def sample(self, repeats: int = 3) -> float:
        t = median_time(lambda: self.f(self.w, self.x).block_until_ready(), repeats)
        self.samples.append(self.w.nbytes / t)
        return self.samples[-1]


CPU_DMA_LATENCY = "/dev/cpu_dma_latency"


@dataclasses.dataclass(frozen=True)
class IdleState:
    """What `idle_polling` got: held (idle cores poll instead of halting) and a line for the report."""
    held: bool
    detail: str


@contextlib.contextmanager
def idle_polling(path: str = CPU_DMA_LATENCY):
    """Holds a wake-up latency request of 0 us (Linux PM QoS, `path`) while the block runs, so idle cores poll
    instead of halting; yields an IdleState.

    Why: every collective of a multi-device step, and every hand-over between threads, puts the thread that
    arrives first to sleep until the other one comes. On a virtual machine a halted core takes tens of
    microseconds to wake (a psum between two devices: about 50 us against 14 us polling, on this project's
    machine). Latency tools make the same request (`cyclictest` asks for 0 us by
    default, `tuned`'s latency-performance profile for 1-3 us; this machine's only idle state but polling exits in
    1 us, so only 0 keeps its cores polling). It lasts only while the file is open: the kernel drops the request
    when it closes, also when the process dies, so nothing of the machine's setting outlives the run. Without
    write access to `path` (not root, no such device) it changes nothing and says why."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        fd, state = None, IdleState(False, f"default (could not open {path}: {e.strerror})")
    else:
        try:
            os.write(fd, struct.pack("i", 0))
            state = IdleState(True, f"polling ({path} held at 0 us for the run)")
        except OSError as e:
            state = IdleState(False, f"default (could not write {path}: {e.strerror})")
    try:
        yield state
    finally:
        if fd is not None:
            os.close(fd)


def expected_distinct_experts(cfg: Config, tokens: int) -> float:
    """E (1 - (1 - X/E)^T): experts a layer touches for T tokens under uniform routing."""
    e, x = cfg.n_routed_experts, cfg.num_experts_per_tok
    return e * (1 - (1 - x / e) ** tokens)


def decode_bytes_per_step(cfg: Config, batch: int) -> float:
    """Weight bytes one decode step reads: everything but the routed experts, plus the distinct selected ones
    (expected count under uniform routing), plus one embedding row per sequence."""
    c = param_counts(cfg)
    item = jnp.dtype(cfg.param_dtype).itemsize
    one_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    fixed = c["total"] - c["routed"] - c["embed"]
    experts = cfg.n_moe_layers * expected_distinct_experts(cfg, batch) * one_expert
    return (fixed + experts + batch * cfg.hidden_size) * item


@partial(jax.jit, static_argnames=("cfg", "steps", "plan"))
def _decode_loop(params, cache, tok, cfg, steps, plan=ExecutionPlan()):
    def body(_, carry):
        cache, tok = carry
        logits, cache = decode_fn(params, cache, tok, cfg, plan)
        return cache, greedy(logits)
    return jax.lax.fori_loop(0, steps, body, (cache, tok))


def bench_ours(cfg: Config, checkpoint: Path | None, args, bandwidth: MatvecBandwidth | None = None) -> dict:
    """tok/s per (kind, size): prefill at each length, decode at each batch. With `bandwidth`, a bandwidth sample
    is taken after each timed decode run, and out[("bw", batch)] is the median of those samples."""
    if checkpoint is not None:
        params, _ = load_hf_checkpoint(checkpoint, cfg)
    else:
        params = init(cfg, jax.random.key(0), std="fan_in")
    rng = np.random.default_rng(0)
    out = {}
    plan = ExecutionPlan()
    prefill_jit = jax.jit(prefill_fn, static_argnames=("cfg", "plan"))  # no donation: the same empty cache each time
    for t in args.prefill_lengths:
        toks = jnp.asarray(rng.integers(2, cfg.vocab_size, size=(1, t)), jnp.int32)
        cache = init_cache(cfg, 1, t)

        def run(cache=cache, toks=toks, t=t):
            return jax.block_until_ready(prefill_jit(params, cache, toks, jnp.array([t]), cfg=cfg, plan=plan))
        out[("prefill", t)] = t / median_time(run, args.repeats)
    prompt = 32
    for b in args.batches:
        max_len = prompt + args.decode_steps + 1
        toks = jnp.asarray(rng.integers(2, cfg.vocab_size, size=(b, prompt)), jnp.int32)
        lens = jnp.full((b,), prompt, jnp.int32)
        logits, cache = _prefill(params, init_cache(cfg, b, max_len), toks, lens, cfg=cfg, plan=plan)
        first = jnp.argmax(logits, -1).astype(jnp.int32)

        def run(cache=cache, first=first):
            return jax.block_until_ready(_decode_loop(params, cache, first, cfg=cfg, steps=args.decode_steps))
        n0 = len(bandwidth.samples) if bandwidth is not None else 0
        out[("decode", b)] = b * args.decode_steps / median_time(
            run, args.repeats, between=None if bandwidth is None else bandwidth.sample)
        if bandwidth is not None:
            out[("bw", b)] = statistics.median(bandwidth.samples[n0:])
    return out


# ---- HF transformers, when the `reference` extra is installed -----------------------------------------------------

def hf_config_dict(cfg: Config) -> dict:
    rs = cfg.rope_scaling
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if rs is not None:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **{k: v for k, v in dataclasses.asdict(rs).items()
                                                                      if k != "type"}}
    keep = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
            "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "rms_norm_eps",
            "max_position_embeddings", "bos_token_id", "eos_token_id")
    d = {k: getattr(cfg, k) for k in keep}
    d.update(num_key_value_heads=cfg.num_attention_heads, num_mtp_layers=0, tie_word_embeddings=False,
             rope_parameters=rope)
    return d


@dataclasses.dataclass
class HFModel:
    model: object
    checkpoint: Path
    cfg: Config

    def bench(self, args) -> dict:
        import torch
        torch.set_num_threads(max(1, __import__("os").cpu_count()))
        rng = np.random.default_rng(0)
        out = {}
        prompt = 32
        with torch.inference_mode():
            for b in args.batches:
                ids = torch.tensor(rng.integers(2, self.cfg.vocab_size, size=(b, prompt)))
                def gen(n, ids=ids):
                    return self.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                               pad_token_id=0, eos_token_id=None)
                t_full = median_time(lambda gen=gen: gen(args.decode_steps + 1), args.repeats)
                t_first = median_time(lambda gen=gen: gen(1), args.repeats)
                out[("decode", b)] = b * args.decode_steps / max(t_full - t_first, 1e-9)
            for t in args.prefill_lengths:
                ids = torch.tensor(rng.integers(2, self.cfg.vocab_size, size=(1, t)))
                out[("prefill", t)] = t / median_time(lambda ids=ids: self.model(ids, logits_to_keep=1),
                                                      args.repeats)
        return out


def try_hf(cfg: Config, tmp: Path) -> HFModel | None:
    """Build HF's DeepseekV3ForCausalLM for cfg with fan-in random weights and save it for our loader."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**hf_config_dict(cfg)))
    model = model.to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    model.save_pretrained(tmp, safe_serialization=True)
    return HFModel(model, tmp, cfg)
