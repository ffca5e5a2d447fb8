"""A request load for the serving benchmark (scripts/benchmark.py): requests with input and output lengths drawn
from ranges, run through the engine at a fixed concurrency (closed loop: a finished request is replaced at once)
or at an arrival rate (Poisson, open loop), and the metrics serving engines publish.

Metrics, as trtllm-bench and vLLM's bench report them: time to first token (from arrival), time per output token
after the first, tokens/s per user (1 / TPOT: the speed a reader sees), tokens/s in total (output tokens over the
wall time of the run), each as a median and a p90 over requests.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from model.engine import Engine, Request
from model.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Load:
    requests: int
    input_len: tuple[int, int]  # drawn uniformly from [lo, hi]
    output_len: tuple[int, int]
    seed: int = 0

    def __post_init__(self):
        for name in ("input_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= lo <= hi, got {(lo, hi)}")
        if self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")

    def items(self, vocab: int, low: int = 0) -> list[tuple[list[int], int]]:
        """(prompt ids, output length) per request: random ids in [low, vocab) (the benchmark measures speed, not
        text), lengths drawn from the ranges."""
        rng = np.random.default_rng(self.seed)
        out = []
        for _ in range(self.requests):
            n_in = int(rng.integers(self.input_len[0], self.input_len[1] + 1))
            n_out = int(rng.integers(self.output_len[0], self.output_len[1] + 1))
            out.append((rng.integers(low, vocab, n_in).tolist(), n_out))
        return out


def run_load(engine: Engine, items, *, concurrency: int | None = None, rate: float | None = None,
             sampling: SamplingParams = SamplingParams(), seed: int = 0) -> tuple[list[Request], float]:
    """Run every item through the engine: at most `concurrency` in flight (closed loop), or arriving at `rate`
    requests/s (Poisson; the engine's slots bound what runs at once). Requests run to their output length (no
    stop tokens). Returns (the requests, the run's wall seconds)."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency and rate")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, len(items))) if rate is not None else None
    queue, reqs, t0 = list(enumerate(items)), [], time.perf_counter()
    while queue or not engine.idle:
        now = time.perf_counter() - t0
        in_flight = sum(not r.done for r in reqs)
        while queue and (in_flight < concurrency if rate is None else arrivals[queue[0][0]] <= now):
            i, (prompt, n_out) = queue.pop(0)
            reqs.append(engine.submit(prompt, max_new_tokens=n_out, sampling=sampling, request_id=i))
            in_flight += 1
        if engine.idle and queue:  # open loop, nothing yet: wait for the next arrival
            time.sleep(max(0.0, arrivals[queue[0][0]] - (time.perf_counter() - t0)))
            continue
        engine.step()
    return reqs, time.perf_counter() - t0


def _stats(values) -> dict:
    v = np.asarray([x for x in values if x is not None], np.float64)
    return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90))} if v.size else \
        {"median": float("nan"), "p90": float("nan")}


def metrics(reqs: list[Request], seconds: float) -> dict:
    """The published metrics of one run (module docstring); times in ms."""
    tokens = sum(len(r.tokens) for r in reqs)
    return {"requests": len(reqs), "output_tokens": tokens, "seconds": seconds, "total_tok_s": tokens / seconds,
            "ttft_ms": _stats(r.ttft_s * 1e3 for r in reqs if r.ttft_s is not None),
            "tpot_ms": _stats(r.tpot_s * 1e3 if r.tpot_s else None for r in reqs),
            "per_user_tok_s": _stats(1 / r.tpot_s if r.tpot_s else None for r in reqs)}
