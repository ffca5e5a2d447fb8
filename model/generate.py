"""generate(): prefill, then a decode loop that stays on the device (one jitted `lax.while_loop`).

Each sequence stops on its own at a stop token or after max_new_tokens; the loop ends when all have stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from model.cache import cache_shapes
from model.config import Config
from model.forward import check_tokens, decode_fn, forward, lm_logits, prefill_fn
from model.mtp import mtp_step, verify_step
from model.params import Params
from model.placement import check_divisible
from model.plan import ExecutionPlan
from model.sampling import SamplingParams, draft_keys, sample, step_keys
from sharding.rules import mesh_size

PAD = -1


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    tokens: np.ndarray  # [B, max_new_tokens] int32, PAD after each sequence's end
    num_generated: np.ndarray  # [B] tokens produced, the stop token included
    stopped: np.ndarray  # [B] bool: ended on a stop token
    drafted: np.ndarray | None = None  # speculative: [B] tokens the MTP module drafted (one per verify step)
    accepted: np.ndarray | None = None  # speculative: [B] drafts the main model accepted

    @property
    def acceptance(self) -> float:
        """Accepted drafts / drafted tokens over the batch (speculative decoding; nan without it)."""
        if self.drafted is None or self.drafted.sum() == 0:
            return float("nan")
        return float(self.accepted.sum() / self.drafted.sum())

    def sequences(self, include_stop: bool = False) -> list[list[int]]:
        out = []
        for row, n, s in zip(self.tokens, self.num_generated, self.stopped):
            keep = n - (1 if s and not include_stop else 0)
            out.append(row[:keep].tolist())
        return out


def _finite_rows(logits, check: bool):
    """[B] bool: the rows' logits hold no NaN or inf (all True when the check is off)."""
    return jnp.all(jnp.isfinite(logits), axis=-1) if check else jnp.ones(logits.shape[:1], bool)


@partial(jax.jit, static_argnames=("cfg", "sp", "max_new_tokens", "max_len", "plan", "check_finite"))
def _generate_loop(params, tokens, lengths, stop_ids, request_ids, kv_scale, cfg, sp, max_new_tokens, max_len, plan,
                   check_finite=True):
    shapes = cache_shapes(cfg, tokens.shape[0], max_len, fp8=kv_scale is not None)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.replace(kv_scale=None))
    cache = cache.replace(kv_scale=kv_scale)
    logits, cache = prefill_fn(params, cache, tokens, lengths, cfg, plan)
    b = tokens.shape[0]
    # The finite check: a row whose logits hold NaN or inf stops there, emits nothing more, and records the step
    # (one reduction over [B, V] per step, no host sync; `generate` raises on it after the loop).
    finite = _finite_rows(logits, check_finite)
    bad = jnp.where(finite, -1, 0).astype(jnp.int32)
    first = jnp.where(finite, sample(logits, step_keys(sp.seed, request_ids, 0), sp), PAD)
    out = jnp.full((b, max_new_tokens), PAD, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids) | (max_new_tokens <= 1) | ~finite
    n_gen = finite.astype(jnp.int32)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, last, out, done, n_gen, bad = state
        logits, cache = decode_fn(params, cache, last, cfg, plan)
        finite = _finite_rows(logits, check_finite)
        bad = jnp.where(~done & ~finite, step, bad)
        nxt = sample(logits, step_keys(sp.seed, request_ids, step), sp)
        nxt = jnp.where(done | ~finite, PAD, nxt)
        out = out.at[:, step].set(nxt)
        n_gen = n_gen + (~done & finite).astype(jnp.int32)
        done = done | ~finite | jnp.isin(nxt, stop_ids) | (step + 1 >= max_new_tokens)
        return step + 1, cache, jnp.maximum(nxt, 0), out, done, n_gen, bad

    state = (jnp.int32(1), cache, jnp.maximum(first, 0), out, done, n_gen, bad)
    _, _, _, out, _, n_gen, bad = jax.lax.while_loop(cond, body, state)
    return out, n_gen, bad


def _take(x, idx):
    """x[b, idx[b]] for x [B, T, ...], idx [B]."""
    return jnp.take_along_axis(x, idx.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


@partial(jax.jit, static_argnames=("cfg", "sp", "max_new_tokens", "max_len", "plan", "check_finite"))
def _speculative_loop(params, tokens, lengths, stop_ids, request_ids, kv_scale, cfg, sp, max_new_tokens, max_len,
                      plan, check_finite=True):
    """Self-speculative decoding with the MTP module, depth 1: the prefill fills both latent caches and drafts the
    first token; each step is `model.mtp.verify_step` (the draft verified, one token emitted, or two when it is
    accepted, the next drafted by the MTP layer with its own cache). Entries past a rejection are overwritten by
    the next step before anything attends to them."""
    b, t = tokens.shape
    shapes = cache_shapes(cfg, b, max_len, fp8=kv_scale is not None)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.replace(kv_scale=None))
    cache = cache.replace(kv_scale=kv_scale)
    mtp = jax.tree.map(lambda s: jnp.zeros((1,) + s.shape[1:], s.dtype), cache_shapes(cfg, b, max_len).replace(
        kv_scale=None))  # the MTP layer's own cache, in the model's dtype
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, cache, _ = forward(params, cache, tokens, positions, None, cfg, plan, "prefill")
    cache = cache.replace(lengths=lengths)
    logits = lm_logits(params, _take(hidden, lengths - 1), cfg)
    finite = _finite_rows(logits, check_finite)
    bad = jnp.where(finite, -1, 0).astype(jnp.int32)
    first = sample(logits, step_keys(sp.seed, request_ids, 0), sp)
    # the MTP over the prompt: entry i from (h_i, t_i+1), the first generated token after the prompt's last
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    nxt = jnp.where(positions == (lengths - 1)[:, None], first[:, None], nxt)
    m_hidden, mtp = mtp_step(params, mtp, hidden, nxt, positions, cfg, plan, "prefill")
    q_logits = lm_logits(params, _take(m_hidden, lengths - 1), cfg)
    draft = sample(q_logits, draft_keys(sp.seed, request_ids, 1, 1), sp)
    out = jnp.full((b, max_new_tokens + 1), PAD, jnp.int32).at[:, 0].set(jnp.where(finite, first, PAD))
    done = jnp.isin(first, stop_ids) | (max_new_tokens <= 1) | ~finite
    n_out = finite.astype(jnp.int32)
    zeros = jnp.zeros(b, jnp.int32)
    rows = jnp.arange(b)

    def cond(state):
        return ~jnp.all(state[5])

    rows_sp = (jnp.full(b, sp.temperature, jnp.float32), jnp.full(b, sp.top_k, jnp.int32),
               jnp.full(b, sp.top_p, jnp.float32))

    def body(state):
        cache, mtp, pending, draft, q_logits, done, out, n_out, drafted, accepted, bad = state
        n = cache.lengths
        logits, ok, tok1, tok2, nxt_draft, q_logits, cache, mtp = verify_step(
            params, cache, mtp, pending, draft, q_logits, n_out, lambda step: step_keys(sp.seed, request_ids, step),
            *rows_sp, cfg, plan)
        finite = _finite_rows(logits[:, 0], check_finite) & (~ok | _finite_rows(logits[:, 1], check_finite))
        bad = jnp.where(~done & ~finite, n_out, bad)
        live = ~done & finite
        second = live & ok & ~jnp.isin(tok1, stop_ids) & (n_out + 1 < max_new_tokens)
        out = out.at[rows, jnp.where(live, n_out, max_new_tokens)].set(jnp.where(live, tok1, PAD), mode="drop")
        out = out.at[rows, jnp.where(second, n_out + 1, max_new_tokens)].set(jnp.where(second, tok2, PAD),
                                                                             mode="drop")
        drafted, accepted = drafted + live, accepted + (live & ok)
        last = jnp.where(second, tok2, tok1)
        n_out = n_out + live + second
        done = done | ~finite | jnp.isin(last, stop_ids) | (n_out >= max_new_tokens)
        grow = jnp.where(done, 0, 1 + ok.astype(jnp.int32))
        return (cache.replace(lengths=n + grow), mtp, jnp.where(ok, tok2, tok1), nxt_draft, q_logits, done, out,
                n_out, drafted, accepted, bad)

    state = (cache, mtp, first, draft, q_logits, done, out, n_out, zeros, zeros, bad)
    state = jax.lax.while_loop(cond, body, state)
    _, _, _, _, _, _, out, n_out, drafted, accepted, bad = state
    return out[:, :max_new_tokens], n_out, bad, drafted, accepted


class NonFiniteError(FloatingPointError):
    """The model produced NaN or inf logits (a weight holding NaN, an overflow): generation stopped there."""


def raise_nonfinite(bad_steps, what: str = "prompt") -> None:
    """Raise NonFiniteError naming the first step (and the row) whose logits were not finite; bad_steps: [B], -1
    where all were finite."""
    bad_steps = np.asarray(bad_steps)
    rows = np.flatnonzero(bad_steps >= 0)
    if rows.size:
        i = int(rows[np.argmin(bad_steps[rows])])
        raise NonFiniteError(f"non-finite logits (NaN or inf) at generation step {int(bad_steps[i])} of {what} {i} "
                             f"(step 0 is the prefill): a weight holding NaN, or an overflow; nothing after it was "
                             f"emitted")


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 16):
    """Right-pad prompts to a common length (rounded up to `multiple`, bounding recompiles)."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    t = int(-(-max(lengths.max(), 1) // multiple) * multiple)
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, lengths


def generate(params: Params, cfg: Config, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), stop_tokens: Sequence[int] = (),
             max_len: int | None = None, request_ids: Sequence[int] | None = None, kv_scale=None,
             plan: ExecutionPlan | None = None, backend: str | None = None, mesh=None,
             check_finite: bool = True, speculative: bool = False) -> GenerateOutput:
    """Generate continuations for a batch of prompts of different lengths.

    Args: prompts: B lists of token ids; max_new_tokens >= 0; stop_tokens: ids that end a sequence (kept as its
      last generated token); max_len: cache length (default: longest prompt + max_new_tokens, padded);
      request_ids: per-sequence ids for the sampling keys (default 0..B-1): a sequence samples the same tokens
      whatever shares its batch as long as its request id and seed are the same; kv_scale: [L, 2] scales of an
      FP8 latent cache (see `init_cache`), None for a cache in the model's dtype; plan, or backend / mesh: as for
      `prefill` (on a mesh, parameters placed with model.shard_params; a batch that the mesh's batch axes do not
      divide is padded with copies of the first prompt, whose outputs are dropped); check_finite: stop a sequence
      at the first step whose logits hold NaN or inf and raise NonFiniteError naming it (docs/benchmarks.md
      measures its cost; off, such a sequence runs on with garbage); speculative: draft one token per step with
      the checkpoint's MTP module and verify it in the same step (`_speculative_loop`): greedy output is the
      same tokens, sampled output the same distribution (not the same draws), and the output counts the drafted
      and accepted tokens.
    """
    plan = ExecutionPlan.build(plan, backend=backend, mesh=mesh)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        check_tokens(cfg, np.asarray(p), what=f"prompt {i} token ids")  # as given: floats refused, not truncated
    if isinstance(stop_tokens, (int, np.integer)) or not isinstance(stop_tokens, Sequence | np.ndarray | set):
        raise ValueError(f"stop_tokens must be a list of token ids, got {stop_tokens!r}")
    stop = (check_tokens(cfg, np.asarray(list(stop_tokens)), what="stop token ids") if len(stop_tokens)
            else np.zeros(0, np.int64))
    b = len(prompts)
    rid = np.arange(b) if request_ids is None else np.asarray(request_ids)
    if rid.shape != (b,):
        raise ValueError(f"request_ids must give one id per prompt ({b}), got shape {rid.shape}")
    pad = 0
    if plan.mesh is not None:
        pad = -b % mesh_size(plan.mesh, plan.rules.axes("batch"))
        prompts = list(prompts) + [prompts[0]] * pad
        rid = np.concatenate([rid, np.full(pad, rid[0])])
    tokens, lengths = pad_prompts(prompts)
    need = int(lengths.max()) + max_new_tokens
    if max_len is None:
        max_len = min(-(-need // 64) * 64, cfg.max_position_embeddings)
    if need > max_len or need > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {int(lengths.max())} tokens + max_new_tokens={max_new_tokens} = {need} "
                         f"exceeds the cache length {max_len} (max_position_embeddings="
                         f"{cfg.max_position_embeddings})")
    tokens = tokens[:, :max_len]
    plan.check("prefill", tokens=tokens.size)
    plan.check("decode", tokens=tokens.shape[0])
    if plan.mesh is not None:
        check_divisible(cfg, plan.mesh, plan.rules, batch=tokens.shape[0])
    if speculative:
        if params.mtp is None:
            raise ValueError("speculative decoding drafts with the MTP module: these parameters have none "
                             "(num_nextn_predict_layers=0, or loaded without it)")
        if plan.attention != "xla":
            raise ValueError("speculative decoding verifies two tokens per sequence and step: the pallas decode "
                             "kernel takes one; use attention='xla'")
    if max_new_tokens == 0:
        return GenerateOutput(np.zeros((b, 0), np.int32), np.zeros(b, np.int32), np.zeros(b, bool))
    stop_arr = jnp.asarray(stop if stop.size else np.array([PAD]), jnp.int32)
    if kv_scale is not None:
        kv_scale = jnp.asarray(kv_scale, jnp.float32)
        if kv_scale.shape != (cfg.num_hidden_layers, 2):
            raise ValueError(f"kv_scale must be [layers, 2] = {(cfg.num_hidden_layers, 2)}, got {kv_scale.shape}")
    loop = _speculative_loop if speculative else _generate_loop
    out, n_gen, bad, *counts = loop(params, jnp.asarray(tokens), jnp.asarray(lengths), stop_arr,
                                    jnp.asarray(rid, jnp.int32), kv_scale, cfg=cfg, sp=sampling,
                                    max_new_tokens=max_new_tokens, max_len=max_len, plan=plan,
                                    check_finite=check_finite)
    raise_nonfinite(np.asarray(bad)[:b])
    counts = [np.asarray(c)[:b] for c in counts] or [None, None]
    out, n_gen = np.asarray(out)[:b], np.asarray(n_gen)[:b]
    last = out[np.arange(b), np.maximum(n_gen - 1, 0)]
    stopped = np.isin(last, stop) if stop.size else np.zeros(b, bool)
    return GenerateOutput(out, n_gen, stopped, *counts)
