"""EleutherAI's lm-evaluation-harness on this model: its three request kinds over a checkpoint at any precision
recipe, on a mesh.

    python scripts/harness.py --tasks gsm8k --checkpoint /data/DeepSeek-R1 --recipe r1_fp4 --mesh expert=8

or, from lm-eval's own API, the registered model "r1jax" (`lm_class()`) with model_args
{"checkpoint": ..., "recipe": "r1_fp4", "mesh": "data=2,expert=4"}.

`HarnessModel` answers the requests of the harness's `LM` interface and needs nothing of the harness:
- loglikelihood((context, continuation)): log p(continuation | <bos> context) and whether greedy decoding would
  produce it; batches of right-padded rows through the serving path's prefill with every position's logits, on
  the plan's mesh;
- loglikelihood_rolling((text,)): the whole text's log-likelihood in windows of max_length tokens, each token
  predicted once with as much context as fits (the harness's rolling-window rule);
- generate_until((context, gen_kwargs)): through the continuous-batching engine (model/engine.py), greedy unless
  do_sample; a request ends at <eos>, at max_gen_toks, or as soon as its text holds one of `until`, and its text
  is cut before it.
`lm_class()` wraps it as a registered harness model ("r1jax"); only that needs lm-eval installed.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from model.cache import init_cache
from model.cli import BUNDLED_CHECKPOINT, apply_recipe, cut_at_stop, halt_at_stop, load_any, quantizes_later
from model.config import Config
from model.engine import Engine
from model.forward import prefill_fn
from model.params import Params
from model.placement import check_divisible, shard_cache
from model.plan import ExecutionPlan
from model.sampling import SamplingParams
from sharding.mesh import make_mesh

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed")


@partial(jax.jit, static_argnames=("cfg", "plan"), donate_argnames=("cache",))
def _token_logprobs(params, cache, inputs, targets, lengths, cfg, plan):
    """inputs, targets [B, T] (targets = inputs shifted by one) -> log p(target) [B, T] and whether it is the
    argmax [B, T]."""
    logits, _ = prefill_fn(params, cache, inputs, lengths, cfg, plan, all_logits=True)
    logp = jax.nn.log_softmax(logits, -1)
    return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], jnp.argmax(logits, -1) == targets


def _request_args(r):
    """An lm-eval Instance's arguments, or the arguments themselves (a tuple), so plain tuples work too."""
    return r.args if hasattr(r, "args") else tuple(r)


class HarnessModel:
    """params, cfg, tok: a model and its tokenizer (model.cli.load_any); plan / kv_scale as for `generate`.
    batch_size: rows per scoring call and slots of the generation engine; max_length: the most tokens one call
    sees (default: the model's positions, at most 4096); max_gen_toks: the default generation limit; bucket:
    scored rows are padded to a multiple of it, so a few shapes compile."""

    def __init__(self, params: Params, cfg: Config, tok, *, plan: ExecutionPlan | None = None, kv_scale=None,
                 batch_size: int = 8, max_length: int | None = None, max_gen_toks: int = 256, bucket: int = 64):
        plan = ExecutionPlan.build(plan)
        for name, v in (("batch_size", batch_size), ("max_gen_toks", max_gen_toks), ("bucket", bucket)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        max_length = min(cfg.max_position_embeddings, 4096) if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or \
                not 2 <= max_length <= cfg.max_position_embeddings:
            raise ValueError(f"max_length must be an integer in [2, {cfg.max_position_embeddings}] (the model's "
                             f"positions), got {max_length!r}")
        if plan.mesh is not None:
            check_divisible(cfg, plan.mesh, plan.rules, batch=batch_size)
        self.params, self.cfg, self.tok, self.plan, self.kv_scale = params, cfg, tok, plan, kv_scale
        self.batch_size, self.max_length, self.max_gen_toks, self.bucket = batch_size, max_length, max_gen_toks, \
            bucket

    @classmethod
    def load(cls, checkpoint: str | Path = BUNDLED_CHECKPOINT, *, recipe: str = "bf16", mesh: str | None = None,
             dtype: str | None = None, tokenizer: str = "auto", **kwargs) -> HarnessModel:
        """From a checkpoint (this project's, or an HF-layout directory such as DeepSeek's release), quantized by
        `recipe` (quant/recipes.py) and placed on a mesh given as "expert=8" or "data=2,expert=4"."""
        m = make_mesh(mesh) if mesh else None
        params, cfg, tok = load_any(checkpoint, tokenizer, mesh=None if quantizes_later(recipe) else m, dtype=dtype)
        params, kv_scale = apply_recipe(params, cfg, tok, recipe, m)
        return cls(params, cfg, tok, plan=ExecutionPlan.build(mesh=m), kv_scale=kv_scale, **kwargs)

    # ---- scoring ----------------------------------------------------------------------------------------------

    def score_ids(self, pairs) -> list[tuple[float, bool]]:
        """[(context ids, continuation ids)] -> [(log p(continuation | context) in nats, greedy or not)]. The
        context is cut from the left so that the row fits max_length; a continuation longer than that is refused."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        rows = []
        for i, (ctx, cont) in enumerate(pairs):
            ctx, cont = list(ctx), list(cont)
            if not cont:
                out[i] = (0.0, True)
                continue
            if not ctx:
                raise ValueError(f"request {i}: an empty context (the model scores after at least <bos>)")
            if len(cont) > self.max_length:
                raise ValueError(f"request {i}: a continuation of {len(cont)} tokens is longer than max_length "
                                 f"({self.max_length})")
            seq = (ctx + cont)[-(self.max_length + 1):]
            rows.append((i, seq, len(cont)))
        rows.sort(key=lambda r: -len(r[1]))  # similar lengths share a batch
        for lo in range(0, len(rows), self.batch_size):
            batch = rows[lo:lo + self.batch_size]
            t = min(-(-(len(batch[0][1]) - 1) // self.bucket) * self.bucket, self.max_length)
            inputs = np.zeros((self.batch_size, t), np.int32)
            targets = np.zeros((self.batch_size, t), np.int32)
            lengths = np.ones(self.batch_size, np.int32)  # rows past the batch: one padding token
            for j, (_, seq, _) in enumerate(batch):
                n = len(seq) - 1
                inputs[j, :n], targets[j, :n], lengths[j] = seq[:-1], seq[1:], n
            cache = init_cache(self.cfg, self.batch_size, t, kv_scale=self.kv_scale)
            if self.plan.mesh is not None:
                cache = shard_cache(cache, self.plan.mesh, self.plan.rules)
            logp, greedy = _token_logprobs(self.params, cache, jnp.asarray(inputs), jnp.asarray(targets),
                                           jnp.asarray(lengths), cfg=self.cfg, plan=self.plan)
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for j, (i, seq, c) in enumerate(batch):
                n = len(seq) - 1
                out[i] = (float(logp[j, n - c:n].sum()), bool(greedy[j, n - c:n].all()))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for r in requests:
            context, continuation = _request_args(r)[:2]
            pairs.append((self.tok.encode(context, add_bos=True), self.tok.encode(continuation)))
        return self.score_ids(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        pairs, owner = [], []
        for k, r in enumerate(requests):
            ids = self.tok.encode(_request_args(r)[0])
            full = [self.tok.bos_id, *ids]
            for start in range(0, len(ids), self.max_length):  # tokens start.. predicted, each exactly once
                pairs.append((full[:start + 1], ids[start:start + self.max_length]))
                owner.append(k)
        total = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, self.score_ids(pairs)):
            total[k] += lp
        return total

    # ---- generation -------------------------------------------------------------------------------------------

    def _settings(self, i: int, kw: dict):
        kw = dict(kw or {})
        unknown = sorted(set(kw) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"request {i}: generation settings {unknown} are not supported (supported: "
                             f"{', '.join(GEN_KWARGS)})")
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        n = int(kw.get("max_gen_toks", self.max_gen_toks))
        temperature = float(kw.get("temperature", 1.0)) if kw.get("do_sample", False) else 0.0  # HF's defaults
        sampling = SamplingParams(temperature=temperature, top_p=float(kw.get("top_p", 1.0)),
                                  top_k=int(kw.get("top_k", 0)), seed=int(kw.get("seed", 0)))
        return until, n, sampling

    def generate_until(self, requests) -> list[str]:
        todo = []
        for i, r in enumerate(requests):
            context, kw = _request_args(r)[:2]
            until, n, sampling = self._settings(i, kw)
            if n >= self.max_length:
                raise ValueError(f"request {i}: max_gen_toks={n} leaves no room for a prompt in max_length "
                                 f"({self.max_length})")
            ids = self.tok.encode(context, add_bos=True)[-(self.max_length - n):]
            todo.append((ids, n, sampling, until))
        if not todo:
            return []
        engine = Engine.for_requests(self.params, self.cfg, [len(ids) + n for ids, n, _, _ in todo],
                                     slots=self.batch_size, plan=self.plan, kv_scale=self.kv_scale)
        eos = self.tok.eos_id
        reqs = [engine.submit(ids, max_new_tokens=n, sampling=sp, stop_tokens=[eos], request_id=i,
                              on_token=halt_at_stop(self.tok, until)) for i, (ids, n, sp, until) in enumerate(todo)]
        engine.run()
        out = []
        for r, (_, _, _, until) in zip(reqs, todo):
            if r.error:
                raise FloatingPointError(f"request {r.request_id}: {r.error}")
            text = self.tok.decode([t for t in r.tokens if t != eos])
            out.append(cut_at_stop(text, until)[0])
        return out


def lm_class():
    """The harness model class "r1jax" (registered with lm-eval on first call; needs lm-eval installed). Its
    model_args are HarnessModel.load's: checkpoint, recipe, mesh, dtype, tokenizer, max_length, max_gen_toks."""
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model, register_model

    try:
        return get_model("r1jax")
    except (KeyError, ValueError):
        pass

    class R1JaxLM(LM):
        def __init__(self, checkpoint: str = str(BUNDLED_CHECKPOINT), recipe: str = "bf16", mesh: str | None = None,
                     dtype: str | None = None, tokenizer: str = "auto", batch_size=None, max_length=None,
                     max_gen_toks: int = 256, max_batch_size=None, device=None):
            super().__init__()
            size = int(batch_size) if str(batch_size or "").isdigit() else 8  # None or "auto": 8
            self.model = HarnessModel.load(checkpoint, recipe=recipe, mesh=mesh, dtype=dtype, tokenizer=tokenizer,
                                           batch_size=size, max_gen_toks=int(max_gen_toks),
                                           max_length=None if max_length is None else int(max_length))

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.model.loglikelihood(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.model.loglikelihood_rolling(requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.model.generate_until(requests)

    register_model("r1jax")(R1JaxLM)
    return R1JaxLM

