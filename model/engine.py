"""A continuous-batching engine: a fixed number of decode slots over one latent cache, requests admitted into free
slots as they come, prefilled in chunks while the others decode, and freed when they finish.

    engine = Engine(params, cfg, slots=8, max_len=512)
    r = engine.submit(prompt_ids, max_new_tokens=64, sampling=SamplingParams(temperature=0.6, seed=1),
                      stop_tokens=[eos], on_token=lambda req, tok: print(tok))
    engine.run()                                  # or engine.step() from your own loop, submitting as you go
    r.tokens, r.finish_reason, r.ttft_s

Each `step()`: free slots take waiting requests (first come, first served); one chunk of `chunk` prompt tokens of
each of the oldest prefilling requests (as many as `prefill_tokens` allows) runs through the model into their
slots in one call (the cache-reading form of attention, at the chunks' positions, `forward` in the decode phase);
then every decoding slot advances by one token in one batched decode step (or by `decode_steps` tokens in one
call), each sampling with its own parameters and keys. The host reads the new tokens each step (for stop tokens,
limits and callbacks). Each call reads the cache only as far as its sequences reach: the shortest of the engine's
`spans` that holds their positions (a static bound, `Cache.span`; one program per length), so a large `max_len`
costs little until requests use it.

With mtp=True each decode step is a verify step, as `generate(..., speculative=True)` runs it: every slot feeds its
pending token and its MTP draft through the main model, keeps one token or two, and the MTP layer (with its own
latent cache, filled chunk by chunk during the prefill) drafts the next; greedy requests get the same tokens.

A request's tokens do not depend on what shares the engine with it: each row of a step is computed on its own,
and its sampling key is fold_in(fold_in(key(seed), request_id), k) at its k-th token, as in `generate`
(tests/test_engine.py checks it under a load of staggered arrivals). A bad request is refused by `submit`, before
anything runs, and the others go on; a request whose logits turn NaN or inf ends with an error naming the step.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from model.cache import init_cache
from model.config import Config
from model.forward import check_tokens, decode_fn, forward, lm_logits
from model.mtp import mtp_step, verify_step
from model.params import Params
from model.placement import check_divisible, shard_cache
from model.plan import ExecutionPlan
from model.sampling import SamplingParams, row_keys, sample_rows, stream_keys
from sharding.rules import mesh_size


@dataclasses.dataclass(eq=False)
class Request:
    """One request and what became of it. finish_reason: None while running, then "stop" (a stop token, kept as
    the last token), "length" or "error" (with `error`). Times are time.perf_counter() seconds."""
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_tokens: frozenset[int]
    request_id: int
    on_token: Callable | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None
    slot: int | None = None
    prefilled: int = 0
    drafted: int = 0  # with mtp=True: verify steps, one draft each
    accepted: int = 0  # drafts the main model accepted

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft_s(self) -> float | None:
        """Time to the first token, from submission."""
        return None if self.t_first is None else self.t_first - self.t_submit

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        if self.t_done is None or self.t_first is None or len(self.tokens) < 2:
            return None
        return (self.t_done - self.t_first) / (len(self.tokens) - 1)


def _slot_view(cache, slots):
    """The cache rows of `slots` [K] (a slot may repeat: a padding row), their first `cache.span` positions."""
    def rows(a):
        return jnp.take(a[:, :, :cache.span], slots, axis=1)
    return cache.replace(c_kv=rows(cache.c_kv), k_pe=rows(cache.k_pe), lengths=cache.lengths[slots])


def _slot_write(cache, part, slots):
    """`part`'s rows (its positions) written back into the cache rows of `slots` (a repeated slot carries the same
    row)."""
    def put(a, b):
        return a.at[:, slots, :b.shape[2]].set(b)
    return cache.replace(c_kv=put(cache.c_kv, part.c_kv), k_pe=put(cache.k_pe, part.k_pe))


SPAN_LEAST, SPAN_MOST = 128, 4  # shorter reads save little; every read length is one more compiled program


def span_ladder(chunk: int, max_len: int, least: int = SPAN_LEAST, most: int = SPAN_MOST) -> tuple[int, ...]:
    """The read lengths an engine compiles for by default: max_len, max_len / 2, max_len / 4, ... (each rounded up
    to a multiple of chunk), at most `most` of them and none below `least`. A call reads the shortest that covers
    its sequences: at most about twice what they hold past the shortest, one program per length and row count.
    Shorter reads save little (a 16-slot step over 128 positions against 64 is a few % on a CPU) and each length
    costs a compile, which for a large model on a GPU is the expensive part."""
    spans = {max_len}
    for k in range(1, most):
        s = -(-(max_len >> k) // chunk) * chunk
        if s < least or s < chunk:
            break
        spans.add(s)
    return tuple(sorted(spans))


def check_spans(spans: Sequence[int] | None, max_len: int) -> None:
    """Refuse read lengths that are not increasing positive integers ending at max_len (None: the default)."""
    if spans is not None and (not isinstance(spans, Sequence) or not spans or
                              not all(isinstance(x, int | np.integer) and x >= 1 for x in spans) or
                              list(spans) != sorted(set(spans)) or spans[-1] != max_len):
        raise ValueError(f"spans must be increasing read lengths ending at max_len={max_len}, got {spans!r}")


def _prefill_rows(params, cache, slots, tokens, start, last, sampling, cfg, plan):
    """What both prefill programs run: tokens [K, C] at positions start [K].. through the cache rows `slots` [K],
    each row's next token sampled from the logits at index last [K] of its chunk (used when that is the prompt's
    last token). Returns (positions [K, C], hidden [K, C, D], the rows' new cache, token [K], finite [K])."""
    pos = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    hidden, part, _ = forward(params, _slot_view(cache, slots), tokens, pos, None, cfg, plan, "decode")
    logits = lm_logits(params, jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0], cfg)  # [K, V]
    return (pos, hidden, part, *_sample(logits, *sampling, jnp.zeros_like(last)))


@partial(jax.jit, static_argnames=("cfg", "plan"), donate_argnames=("cache",))
def _prefill_chunk(params, cache, slots, tokens, start, last, temperature, top_k, top_p, seeds, request_ids, cfg,
                   plan):
    """One chunk of each of K requests into the cache rows `slots` (`_prefill_rows`). Returns (token [K],
    finite [K], the cache)."""
    _, _, part, tok, finite = _prefill_rows(params, cache, slots, tokens, start, last,
                                            (temperature, top_k, top_p, seeds, request_ids), cfg, plan)
    cache = _slot_write(cache, part, slots).replace(lengths=cache.lengths.at[slots].set(start + last + 1))
    return tok, finite, cache


@jax.jit
def _sample(logits, temperature, top_k, top_p, seeds, request_ids, steps):
    return sample_rows(logits, row_keys(seeds, request_ids, steps), temperature, top_k, top_p), \
        jnp.all(jnp.isfinite(logits), axis=-1)


@partial(jax.jit, static_argnames=("cfg", "plan", "n"), donate_argnames=("cache",))
def _decode_slots(params, cache, host, temperature, top_k, top_p, seeds, request_ids, cfg, plan, n):
    """n tokens for every slot in one call, each step fed the token of the one before; host: [3, B] int32 rows
    (last token, tokens so far, tokens it may still emit: 0 for a slot not decoding), one transfer per call. A
    slot's length advances while it has budget left: a slot not decoding keeps its length (its writes land past
    it and are overwritten before anything reads them), and one that stops at a stop token inside the n steps runs
    on into positions nothing reads (the host drops those tokens and frees the slot). Returns (tokens [n, B],
    finite [n, B], the cache)."""
    tokens, steps, budget = host

    def one(carry, i):
        cache, tok = carry
        live = i < budget
        logits, new = decode_fn(params, cache, tok, cfg, plan)
        nxt, finite = _sample(logits, temperature, top_k, top_p, seeds, request_ids, steps + i)
        new = new.replace(lengths=jnp.where(live, cache.lengths + 1, cache.lengths))
        return (new, jnp.where(live, nxt, tok)), (nxt, finite)

    (cache, _), (nxt, finite) = jax.lax.scan(one, (cache, tokens), jnp.arange(n))
    return nxt, finite, cache


@partial(jax.jit, static_argnames=("cfg", "plan"), donate_argnames=("cache", "mtp", "draft", "q"))
def _prefill_chunk_mtp(params, cache, mtp, draft, q, slots, tokens, nxt, start, last, final, temperature, top_k,
                       top_p, seeds, request_ids, cfg, plan):
    """`_prefill_chunk` with the MTP layer's own cache filled too: its entry for each chunk position i comes from
    (h_i, the prompt's token i + 1), the next tokens nxt [K, C] given by the host; on a request's last chunk
    (final [K]) the last entry takes the first generated token, sampled here, and drafts the token after it.
    Returns (first token [K], finite [K], the caches, the slots' drafts [B] and draft logits [B, V])."""
    pos, hidden, part, first, finite = _prefill_rows(params, cache, slots, tokens, start, last,
                                                     (temperature, top_k, top_p, seeds, request_ids), cfg, plan)
    nxt = jnp.where(final[:, None] & (jnp.arange(nxt.shape[1]) == last[:, None]), first[:, None], nxt)
    g, m_part = mtp_step(params, _slot_view(mtp, slots), hidden, nxt, pos, cfg, plan, "decode")
    q_new = lm_logits(params, jnp.take_along_axis(g, last[:, None, None], axis=1)[:, 0], cfg)  # [K, V]
    d = sample_rows(q_new, stream_keys(row_keys(seeds, request_ids, jnp.ones_like(last)), 1), temperature,
                    top_k, top_p)
    draft = draft.at[slots].set(jnp.where(final, d, draft[slots]))
    q = q.at[slots].set(jnp.where(final[:, None], q_new, q[slots]))
    cache = _slot_write(cache, part, slots).replace(lengths=cache.lengths.at[slots].set(start + last + 1))
    return first, finite, cache, _slot_write(mtp, m_part, slots), draft, q


@partial(jax.jit, static_argnames=("cfg", "plan"), donate_argnames=("cache", "mtp", "draft", "q"))
def _verify_slots(params, cache, mtp, draft, q, host, temperature, top_k, top_p, seeds, request_ids, cfg, plan):
    """One verify step for every slot (`model.mtp.verify_step`, with each slot's own sampling). host: [3, B]
    (pending token, tokens so far, tokens it may still emit: 0 for a slot not decoding).
    Returns ([4, B]: first token, second token, accepted, finite; the caches; the new drafts and draft logits)."""
    pending, n_out, active = host[0], host[1], host[2] > 0
    n = cache.lengths
    logits, ok, tok1, tok2, d, q_new, cache, mtp = verify_step(
        params, cache, mtp, pending, draft, q, n_out, lambda step: row_keys(seeds, request_ids, step), temperature,
        top_k, top_p, cfg, plan)
    fin = jnp.isfinite(logits)
    finite = jnp.all(fin[:, 0], -1) & (~ok | jnp.all(fin[:, 1], -1))
    cache = cache.replace(lengths=n + jnp.where(active, 1 + ok.astype(jnp.int32), 0))
    draft, q = jnp.where(active, d, draft), jnp.where(active[:, None], q_new, q)
    return jnp.stack([tok1, tok2, ok.astype(jnp.int32), finite.astype(jnp.int32)]), cache, mtp, draft, q


def _commit(tree):
    return jax.device_put(tree, jax.devices()[0])


class Engine:
    """See the module docstring. slots: decode slots (the batch of every decode step); max_len: cache positions
    per slot (a multiple of `chunk`), the most prompt + new tokens a request may have; chunk: prompt tokens per
    prefill call; prefill_tokens: prompt tokens one step may prefill (chunks of that many requests at once, at
    least one); decode_steps: tokens each slot decodes per step, in one call and one read of the results (the
    host's round trip paid once for them; a request admitted meanwhile waits for the next step; tokens past a
    request's stop are dropped); plan: an ExecutionPlan (a mesh whose batch axes divide `slots`; with
    attention="pallas" the decode steps run the decode kernel, which reads each slot's cache only up to its
    length, and the prompt chunks the xla attention); kv_scale: an FP8 cache's scales, as for `generate`; mtp:
    draft with the MTP module and verify every step (module docstring); spans: the cache read lengths programs are
    compiled for, increasing and ending at max_len (default `span_ladder`: max_len, max_len / 2, ... down to 128
    positions, four at most): each call reads, and attends over, the shortest that holds its sequences'
    positions, so short requests cost about what their lengths do whatever max_len is; (max_len,) compiles one
    program of each kind, reading the whole cache."""

    def __init__(self, params: Params, cfg: Config, *, slots: int, max_len: int, chunk: int = 64,
                 prefill_tokens: int = 1024, decode_steps: int = 1, plan: ExecutionPlan | None = None,
                 kv_scale=None, mtp: bool = False, spans: Sequence[int] | None = None):
        plan = ExecutionPlan.build(plan)
        if mtp and params.mtp is None:
            raise ValueError("mtp=True drafts with the MTP module: these parameters have none")
        if slots < 1 or chunk < 1 or prefill_tokens < 1 or decode_steps < 1:
            raise ValueError(f"slots, chunk, prefill_tokens and decode_steps must be >= 1, got slots={slots}, "
                             f"chunk={chunk}, prefill_tokens={prefill_tokens}, decode_steps={decode_steps}")
        if mtp and decode_steps > 1:
            raise ValueError("mtp=True verifies one draft per step: use decode_steps=1")
        if max_len % chunk:
            raise ValueError(f"max_len ({max_len}) must be a multiple of chunk ({chunk}): a last partial chunk "
                             f"writes a whole chunk of positions")
        check_spans(spans, max_len)
        if plan.attention == "pallas":  # the decode kernel: one token per sequence, the cache in 16-slot tiles
            if mtp:
                raise ValueError("mtp=True verifies two tokens per step, which the pallas decode kernel does not: "
                                 "use attention='xla'")
            if max_len % 16:
                raise ValueError(f"the pallas decode kernel reads the cache in tiles of 16 positions: max_len must "
                                 f"be a multiple of 16, got {max_len}")
        plan.check("decode", tokens=slots)
        if plan.mesh is not None:
            check_divisible(cfg, plan.mesh, plan.rules, batch=slots)
        self.params, self.cfg, self.plan, self.chunk = params, cfg, plan, chunk
        # prompt chunks run through the cache-reading xla attention (many tokens per sequence); the decode steps
        # through the plan's, the pallas kernel included, which reads each slot's cache up to its length
        self.prefill_plan = dataclasses.replace(plan, attention="xla")
        self.slots, self.max_len = slots, max_len
        self.spans = span_ladder(chunk, max_len) if spans is None else tuple(int(x) for x in spans)
        self.prefill_rows = min(slots, max(1, prefill_tokens // chunk))
        self.decode_steps = decode_steps
        cache = init_cache(cfg, slots, max_len, kv_scale=kv_scale)
        # committed to its device(s) from the start: the step functions' outputs are, and a first call with an
        # uncommitted cache would compile each program once more
        self.cache = shard_cache(cache, plan.mesh, plan.rules) if plan.mesh is not None else _commit(cache)
        self.mtp = None
        if mtp:  # the MTP layer's own latent cache (model dtype), each slot's draft and its logits
            m = init_cache(cfg.replace(num_hidden_layers=1, first_k_dense_replace=0), slots, max_len)
            self.mtp = shard_cache(m, plan.mesh, plan.rules) if plan.mesh is not None else _commit(m)
            self._draft = _commit(jnp.zeros(slots, jnp.int32))
            self._q = _commit(jnp.zeros((slots, cfg.vocab_size), jnp.float32))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request | None] = [None] * slots
        self.finished: list[Request] = []
        self._ids = itertools.count()
        self._slot_params = None  # the slots' sampling parameters on the device, rebuilt when the slots change
        self.steps = 0

    @classmethod
    def for_requests(cls, params: Params, cfg: Config, positions: Sequence[int], *, slots: int, chunk: int = 64,
                     plan: ExecutionPlan | None = None, **kwargs) -> Engine:
        """An engine sized for a known set of requests, each needing `positions` cache positions (prompt + new
        tokens): max_len the most of them, rounded up to `chunk`; at most `slots` slots, no more than there are
        requests, rounded up to a multiple of the plan's mesh batch axes. Other arguments as for the engine."""
        plan = ExecutionPlan.build(plan)
        n = min(slots, max(len(positions), 1))
        if plan.mesh is not None:  # every decode step's batch is split over the mesh's batch axes
            per = mesh_size(plan.mesh, plan.rules.axes("batch"))
            n = -(-n // per) * per
        need = max(positions, default=1)
        return cls(params, cfg, slots=n, max_len=-(-need // chunk) * chunk, chunk=chunk, plan=plan, **kwargs)

    # ---- requests ----------------------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], *, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
               stop_tokens: Sequence[int] = (), request_id: int | None = None,
               on_token: Callable | None = None) -> Request:
        """Queue a request, checked first: a bad one raises ValueError naming the problem and changes nothing.
        request_id: the sampling key's id (default: the order of submission). on_token(request, token) is called
        as each token is produced; when it returns True the request ends there, as at a stop token (a stop string,
        say, that the caller watches for in the decoded text)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) or \
                max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if len(prompt) == 0:
            raise ValueError("the prompt is empty: a request needs at least one token")
        ids = check_tokens(self.cfg, np.asarray(prompt), "prompt token ids")
        if ids.ndim != 1:
            raise ValueError(f"the prompt must be a list of token ids, got shape {ids.shape}")
        if len(ids) + max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds the engine's "
                             f"max_len={self.max_len}")
        if isinstance(stop_tokens, int | np.integer):
            raise ValueError(f"stop_tokens must be a list of token ids, got {stop_tokens!r}")
        stop = check_tokens(self.cfg, np.asarray(list(stop_tokens), np.int64), "stop token ids")
        rid = next(self._ids) if request_id is None else request_id
        if isinstance(rid, bool) or not isinstance(rid, int | np.integer):
            raise ValueError(f"request_id must be an integer, got {rid!r}")
        req = Request(ids.tolist(), int(max_new_tokens), sampling, frozenset(stop.tolist()), int(rid), on_token,
                      t_submit=time.perf_counter())
        self.waiting.append(req)
        return req

    @property
    def idle(self) -> bool:
        return not self.waiting and all(r is None for r in self.running)

    def run(self) -> list[Request]:
        """Step until every submitted request has finished; returns them in the order they finished."""
        while not self.idle:
            self.step()
        return self.finished

    # ---- one step ----------------------------------------------------------------------------------------------

    def step(self) -> None:
        for i, r in enumerate(self.running):
            if r is None and self.waiting:
                r = self.waiting.popleft()
                r.slot, r.prefilled, self.running[i] = i, 0, r
                self._slot_params = None
        prefilling = [r for r in self.running if r is not None and r.prefilled < len(r.prompt)]
        if prefilling:
            self._prefill(sorted(prefilling, key=lambda r: r.t_submit)[:self.prefill_rows])
        decoding = [r for r in self.running if r is not None and r.prefilled == len(r.prompt) and r.tokens]
        if decoding:
            self._decode(decoding)
        self.steps += 1

    @staticmethod
    def _params(reqs):
        """The requests' sampling parameters as [B] arrays: temperature, top_k, top_p, seed, request id."""
        sp = [r.sampling for r in reqs]
        return (np.asarray([s.temperature for s in sp], np.float32), np.asarray([s.top_k for s in sp], np.int32),
                np.asarray([s.top_p for s in sp], np.float32), np.asarray([s.seed for s in sp], np.int32),
                np.asarray([r.request_id for r in reqs], np.int32))

    def _prefill(self, reqs: list[Request]) -> None:
        """One chunk of each of `reqs` in one call, padded to a power of two of rows (the programs compiled stay
        few) with copies of the first row, which write the same values into the same slot."""
        k = 1 << (len(reqs) - 1).bit_length()
        rows = reqs + [reqs[0]] * (k - len(reqs))
        tokens, nxt = np.zeros((2, k, self.chunk), np.int32)
        start, last, final, slots = (np.zeros(k, np.int32) for _ in range(4))
        for i, r in enumerate(rows):
            s = start[i] = r.prefilled
            piece = r.prompt[s:s + self.chunk]
            tokens[i, :len(piece)] = piece
            after = r.prompt[s + 1:s + 1 + self.chunk]
            nxt[i, :len(after)] = after
            last[i], final[i], slots[i] = len(piece) - 1, s + len(piece) == len(r.prompt), r.slot
        span = self._span(int(start.max()) + self.chunk)  # every chunk position is written, the last read
        cache = self.cache.replace(span=span)
        if self.mtp is not None:
            tok, finite, self.cache, self.mtp, self._draft, self._q = _prefill_chunk_mtp(
                self.params, cache, self.mtp.replace(span=span), self._draft, self._q, slots, tokens, nxt, start,
                last, final.astype(bool), *self._params(rows), cfg=self.cfg, plan=self.prefill_plan)
        else:
            tok, finite, self.cache = _prefill_chunk(self.params, cache, slots, tokens, start, last,
                                                     *self._params(rows), cfg=self.cfg, plan=self.prefill_plan)
        tok, finite = np.asarray(tok), np.asarray(finite)
        for i, r in enumerate(reqs):
            r.prefilled += int(last[i]) + 1
            if final[i]:
                self._emit(r, int(tok[i]), bool(finite[i]))

    def _decode(self, decoding: list[Request]) -> None:
        # every slot takes part (static shapes); the others carry a dummy token and keep their length
        rows = [r if r in decoding else None for r in self.running]
        if self._slot_params is None:  # a free slot samples with a stand-in's parameters, unused
            self._slot_params = jax.device_put(self._params([r or decoding[0] for r in self.running]))
        host = np.zeros((3, self.slots), np.int32)
        for i, r in enumerate(rows):
            if r is not None:
                host[:, i] = r.tokens[-1], len(r.tokens), r.max_new_tokens - len(r.tokens)
        # the positions this call's live queries read: each slot's cache holds prompt + tokens - 1 (the last token
        # is fed now); a verify step feeds two tokens, a decode step one a step while the slot has budget left.
        # The pallas decode kernel reads each slot's cache up to its length itself: no bound.
        span = None if self.plan.attention == "pallas" else self._span(max(
            len(r.prompt) + len(r.tokens) - 1 + (
                2 if self.mtp is not None else min(self.decode_steps, r.max_new_tokens - len(r.tokens)))
            for r in decoding))
        cache = self.cache.replace(span=span)
        if self.mtp is not None:
            out, self.cache, self.mtp, self._draft, self._q = _verify_slots(
                self.params, cache, self.mtp.replace(span=span), self._draft, self._q, host, *self._slot_params,
                cfg=self.cfg, plan=self.plan)
            for r, (t1, t2, ok, fin) in zip(rows, np.asarray(out).T):
                if r is not None:
                    r.drafted, r.accepted = r.drafted + 1, r.accepted + int(ok)
                    self._emit(r, int(t1), bool(fin))
                    if ok and not r.done:
                        self._emit(r, int(t2), True)
            return
        nxt, finite, self.cache = _decode_slots(self.params, cache, host, *self._slot_params,
                                                cfg=self.cfg, plan=self.plan, n=self.decode_steps)
        nxt, finite = np.asarray(nxt), np.asarray(finite)
        for step_tokens, step_finite in zip(nxt, finite):  # in order, as that many single steps would emit them
            for r, t, ok in zip(rows, step_tokens, step_finite):
                if r is not None and not r.done:
                    self._emit(r, int(t), bool(ok))

    def _span(self, need: int) -> int:
        """The shortest of the engine's read lengths that holds `need` positions."""
        return next(s for s in self.spans if s >= need)

    def _emit(self, r: Request, tok: int, finite: bool) -> None:
        now = time.perf_counter()
        if not finite:
            r.error = (f"non-finite logits (NaN or inf) at generation step {len(r.tokens)} (step 0 is the prefill): "
                       f"a weight holding NaN, or an overflow; nothing after it was emitted")
            self._finish(r, "error", now)
            return
        r.tokens.append(tok)
        if r.t_first is None:
            r.t_first = now
        halt = r.on_token(r, tok) if r.on_token is not None else False
        if tok in r.stop_tokens or halt:
            self._finish(r, "stop", now)
        elif len(r.tokens) >= r.max_new_tokens:
            self._finish(r, "length", now)

    def _finish(self, r: Request, reason: str, now: float) -> None:
        r.finish_reason, r.t_done = reason, now
        self.running[r.slot] = None
        self._slot_params = None
        self.finished.append(r)
