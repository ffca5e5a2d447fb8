"""A roofline model of serving: the decode step's time from the bytes it reads, the FLOPs it runs and the bytes
it moves between devices, and from that tokens/s per user and in total, with or without MTP drafts; prefill too.

The weight bytes come from the same declarations and recipes as the memory planner (model/memory.py): the recipe
is applied to the abstract parameters and every stored array is counted, so a recipe means the same bytes here
and there. Per step, on a node of G devices:

    W = attention (x G under data-parallel attention) + dense MLPs + shared experts (x G, likewise)
        + D(T) routed experts per MoE layer + router + LM head          T = B (1 + k) tokens, k MTP drafts
    D(T) = E (1 - (1 - X/E)^T)           distinct experts per layer, tokens routed independently and uniformly
    KV = B * context * layers * (C + R) * cache bytes  (x G under tensor-parallel attention: one latent "head",
         replicated)
    F = T * (2 * active matmul parameters + 2 N (2C + R) context per layer)    (absorbed attention)
    comm: tensor-parallel attention, two all-reduces of T x D per layer; expert parallelism, dispatch and
          combine of T x X rows of D per MoE layer, (G - 1) / G of them leaving each device
    t = combine(W + KV over eta_bw x bandwidth, F over eta_f x the peak of each matmul's dtype)
        + comm / eta_c + t_fix x (layers + 1 per MTP pass)

Each MTP draft pass (k of them per step, sequential) reads the MTP layer (its D(B) experts) and the head and runs
B tokens. tokens/s per user = a / t, in total B a / t, with a = 1 + sum_i prod_(j <= i) p_j the accepted length.

`IDEAL` is the pure bound (everything at peak, perfect overlap, no fixed cost). `CALIBRATED` sums the terms at
fitted efficiencies and a fixed cost per layer (launches, tails, synchronisation) fitted to NVIDIA's published
batch-1 figure; `compare` prints both beside every published figure (`ANCHORS`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from model.config import Config
from model.memory import quantized_abstract
from model.params import is_info, param_infos
from quant.recipes import get_recipe


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    hbm_gb: float
    bandwidth_tb_s: float  # HBM, per device
    peak_tflops: tuple[tuple[str, float], ...]  # dense tensor-core peak per operand dtype
    link_gb_s: float  # NVLink, per device and direction

    def peak(self, dtype: str) -> float:
        """FLOP/s for matmuls in `dtype`; a dtype the device lacks runs at the best it has below it (FP4 on
        Hopper: dequantized to BF16)."""
        table = dict(self.peak_tflops)
        for d in {"fp4": ("fp4", "bf16"), "fp8": ("fp8", "bf16"), "bf16": ("bf16",)}[dtype]:
            if d in table:
                return table[d] * 1e12
        raise ValueError(f"{self.name} has no peak for {dtype}")


# dense peaks (the datasheets quote 2:4 sparse, twice these); sources in docs/roofline.md
HARDWARE = {
    "H100": Hardware("H100 SXM", 80, 3.35, (("bf16", 989), ("fp8", 1979)), 450),
    "H200": Hardware("H200 SXM", 141, 4.8, (("bf16", 989), ("fp8", 1979)), 450),
    "B200": Hardware("B200", 180, 8.0, (("bf16", 2250), ("fp8", 4500), ("fp4", 9000)), 900),
}


@dataclasses.dataclass(frozen=True)
class Efficiency:
    bandwidth: float = 1.0  # achieved share of HBM bandwidth
    flops: float = 1.0  # achieved share of the matmul peak
    comm: float = 1.0  # achieved share of the link bandwidth
    t_fix_us: float = 0.0  # fixed cost per layer and step (launches, tails, synchronisation)
    overlap: bool = True  # memory and compute overlap (max), or not (sum)


IDEAL = Efficiency()
# fitted to the published batch-1 B200 figure without MTP (t_fix) and the max-throughput points (the rest)
CALIBRATED = Efficiency(bandwidth=0.5, flops=0.4, comm=0.5, t_fix_us=140.0, overlap=False)


@dataclasses.dataclass(frozen=True)
class Point:
    """An operating point: B sequences at a mean context, k MTP drafts accepted with conditional probabilities
    p_1..p_k (or an accepted length given directly), attention tensor-parallel ("tp") or data-parallel ("dp")
    over `devices`, routed experts split over all of them."""
    batch: int
    context: int
    devices: int = 8
    attention: str = "tp"
    mtp_depth: int = 0
    acceptance: tuple[float, ...] = ()
    accepted_length: float | None = None

    def __post_init__(self):
        if self.batch < 1 or self.context < 1 or self.devices < 1 or self.mtp_depth < 0:
            raise ValueError(f"batch, context and devices must be >= 1 and mtp_depth >= 0: {self}")
        if self.attention not in ("tp", "dp"):
            raise ValueError(f"attention must be 'tp' or 'dp', got {self.attention!r}")
        if self.accepted_length is None and len(self.acceptance) != self.mtp_depth:
            raise ValueError(f"give one acceptance per draft ({self.mtp_depth}) or accepted_length")

    @property
    def a(self) -> float:
        """Tokens emitted per step (1 without MTP)."""
        if self.accepted_length is not None:
            return self.accepted_length
        return 1.0 + sum(math.prod(self.acceptance[:i + 1]) for i in range(self.mtp_depth))


@dataclasses.dataclass(frozen=True)
class ModelBytes:
    """What a step reads, by class, in bytes (whole model, unsharded), and each class's matmul dtype."""
    attention: float  # per layer
    dense: float  # all dense-layer MLPs
    shared: float  # per MoE layer
    expert: float  # one routed expert of one layer
    router: float  # all layers, norms included
    head: float
    mtp_fixed: float  # the MTP layer without its routed experts (eh_proj, attention, shared, router, norms)
    mtp_expert: float
    dtypes: tuple[tuple[str, str], ...]  # class -> matmul dtype (bf16, fp8, fp4)
    cache_bytes: float  # per token per layer
    params: tuple[tuple[str, int], ...]  # matmul parameters per class (per layer / per expert as above)


def _matmul_dtype(rule) -> str:
    if rule is None or not rule.act:
        return "bf16"
    return "fp8" if rule.fmt == "fp8" else "fp4"


def model_bytes(cfg: Config, recipe: str) -> ModelBytes:
    """The bytes of each class as `recipe` stores them (the planner's quantized abstract tree)."""
    r = get_recipe(recipe)
    with_mtp = cfg.num_nextn_predict_layers > 0
    infos = jax.tree_util.tree_flatten_with_path(param_infos(cfg, with_mtp=with_mtp), is_leaf=is_info)[0]
    leaves = jax.tree.leaves(quantized_abstract(cfg, r), is_leaf=lambda x: hasattr(x, "codes"))
    b: dict[str, float] = {}
    n: dict[str, int] = {}
    for (path, info), leaf in zip(infos, leaves):
        name = jax.tree_util.keystr(path)
        size = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(leaf))
        routed = ".ffn.we" in name
        if name.startswith(".mtp"):
            cls = "mtp_expert" if routed else "mtp_fixed"
        elif name == ".lm_head":
            cls = "head"
        elif name == ".embed":
            continue  # a row lookup per token
        else:
            cls = {"attention": "attention", "dense_mlp": "dense", "shared": "shared", "routed": "expert"}.get(
                info.group, "router")
        b[cls] = b.get(cls, 0) + size
        n[cls] = n.get(cls, 0) + (math.prod(info.shape) if info.group != "norm" else 0)
    moe, e = cfg.n_moe_layers, cfg.n_routed_experts
    per = {"attention": cfg.num_hidden_layers, "shared": moe, "expert": moe * e, "mtp_expert": e}
    b = {k: v / per.get(k, 1) for k, v in b.items()}
    n = {k: v // per.get(k, 1) for k, v in n.items()}
    dtypes = {"attention": _matmul_dtype(r.rule("attention")), "dense": _matmul_dtype(r.rule("dense_mlp")),
              "shared": _matmul_dtype(r.rule("shared")), "expert": _matmul_dtype(r.rule("routed")),
              "router": "bf16", "head": "bf16", "mtp": _matmul_dtype(r.rule("mtp"))}
    cache = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * (1 if r.kv_fp8 else 2)
    return ModelBytes(attention=b.get("attention", 0), dense=b.get("dense", 0), shared=b.get("shared", 0),
                      expert=b.get("expert", 0), router=b.get("router", 0), head=b["head"],
                      mtp_fixed=b.get("mtp_fixed", 0), mtp_expert=b.get("mtp_expert", 0),
                      dtypes=tuple(dtypes.items()), cache_bytes=cache, params=tuple(n.items()))


def distinct_experts(cfg: Config, tokens: float) -> float:
    """Expected distinct routed experts per layer hit by `tokens` tokens (uniform, independent routing)."""
    e, x = cfg.n_routed_experts, cfg.num_experts_per_tok
    return e * (1 - (1 - x / e) ** tokens)


@dataclasses.dataclass(frozen=True)
class Step:
    seconds: float
    memory_s: float
    compute_s: float
    comm_s: float
    fixed_s: float
    weight_bytes: float  # read by the node in one step
    kv_bytes: float
    flops: float
    tokens_per_s_user: float
    tokens_per_s_total: float


def decode_step(cfg: Config, mb: ModelBytes, hw: Hardware, pt: Point, eff: Efficiency = IDEAL) -> Step:
    """The predicted decode step at `pt` (module docstring)."""
    g, bsz, k = pt.devices, pt.batch, pt.mtp_depth
    t = bsz * (1 + k)
    rep = g if pt.attention == "dp" else 1  # copies of the non-expert weights read across the node
    moe, layers = cfg.n_moe_layers, cfg.num_hidden_layers
    dt = dict(mb.dtypes)
    params = dict(mb.params)
    w_main = (layers * mb.attention * rep + (mb.dense + moe * mb.shared) * rep + mb.router
              + moe * distinct_experts(cfg, t) * mb.expert + mb.head * rep)
    w_mtp = k * (mb.mtp_fixed * rep + distinct_experts(cfg, bsz) * mb.mtp_expert + mb.head * rep)
    kv = bsz * pt.context * layers * mb.cache_bytes * (g if pt.attention == "tp" else 1)
    # FLOPs by matmul dtype: the main model over T tokens, the MTP layer k times over B tokens
    x = cfg.num_experts_per_tok
    by_dtype: dict[str, float] = {}

    def add(dtype, flops):
        by_dtype[dtype] = by_dtype.get(dtype, 0.0) + flops

    add(dt["attention"], 2 * t * layers * params.get("attention", 0))
    add(dt["dense"], 2 * t * params.get("dense", 0))
    add(dt["shared"], 2 * t * moe * params.get("shared", 0))
    add(dt["expert"], 2 * t * moe * x * params.get("expert", 0))
    add("bf16", 2 * (t + k * bsz) * (params.get("head", 0) + params.get("router", 0)))
    attn_core = 2 * cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * pt.context
    add("bf16", t * layers * attn_core + k * bsz * attn_core)
    add(dt["mtp"], 2 * k * bsz * (params.get("mtp_fixed", 0) + x * params.get("mtp_expert", 0)))
    mem = (w_main + w_mtp + kv) / (eff.bandwidth * g * hw.bandwidth_tb_s * 1e12)
    cmp = sum(f / (eff.flops * g * hw.peak(d)) for d, f in by_dtype.items())
    d, link = cfg.hidden_size, eff.comm * hw.link_gb_s * 1e9
    comm = 0.0
    if g > 1:
        per_dev_tokens = t / g if pt.attention == "dp" else t
        if pt.attention == "tp":  # two all-reduces of [T, D] bf16 per layer, ring: 2 (G-1)/G of it each way
            comm += 2 * layers * 2 * (g - 1) / g * t * d * 2 / link
        # dispatch (activations in the experts' dtype) and combine (bf16) of each device's rows
        act = {"fp4": 0.5625, "fp8": 1.0}.get(dt["expert"], 2.0)
        comm += moe * per_dev_tokens * x * (g - 1) / g * d * (act + 2) / link
    fixed = eff.t_fix_us * 1e-6 * (layers + k)
    secs = (max(mem, cmp) if eff.overlap else mem + cmp) + comm + fixed
    return Step(secs, mem, cmp, comm, fixed, w_main + w_mtp, kv, sum(by_dtype.values()),
                pt.a / secs, bsz * pt.a / secs)


def held_per_device(cfg: Config, mb: ModelBytes, pt: Point) -> float:
    """Bytes each device holds: its share of the weights (the routed experts split over the devices, the rest
    split under tensor-parallel attention and whole under data-parallel) and of the cache at `pt`."""
    rest = (cfg.num_hidden_layers * mb.attention + mb.dense + cfg.n_moe_layers * mb.shared + mb.router + 2 * mb.head
            + mb.mtp_fixed)  # the embedding as big as the head
    experts = (cfg.n_moe_layers * mb.expert + mb.mtp_expert) * cfg.n_routed_experts
    kv = pt.batch * pt.context * cfg.num_hidden_layers * mb.cache_bytes
    return (rest / (pt.devices if pt.attention == "tp" else 1) + experts / pt.devices
            + kv / (1 if pt.attention == "tp" else pt.devices))


def prefill_seconds(cfg: Config, mb: ModelBytes, hw: Hardware, tokens: int, devices: int = 8,
                    eff: Efficiency = IDEAL) -> float:
    """One prompt of `tokens` tokens: every weight read once (all experts hit), the linears' FLOPs and the naive
    attention's causal half (2 N (H + R + V) S / 2 per token and layer)."""
    params = dict(mb.params)
    w = (cfg.num_hidden_layers * mb.attention + mb.dense + cfg.n_moe_layers * (mb.shared + cfg.n_routed_experts
         * mb.expert) + mb.router + mb.head)
    lin = 2 * (cfg.num_hidden_layers * params.get("attention", 0) + params.get("dense", 0) + cfg.n_moe_layers
               * (params.get("shared", 0) + cfg.num_experts_per_tok * params.get("expert", 0))
               + params.get("head", 0))
    h, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    attn = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * (h + r + v) * tokens / 2
    dt = dict(mb.dtypes)
    mem = w / (eff.bandwidth * devices * hw.bandwidth_tb_s * 1e12)
    cmp = tokens * (lin / (eff.flops * devices * hw.peak(dt["expert"])) + attn / (eff.flops * devices
                                                                                 * hw.peak("bf16")))
    return (max(mem, cmp) if eff.overlap else mem + cmp) + eff.t_fix_us * 1e-6 * cfg.num_hidden_layers


@dataclasses.dataclass(frozen=True)
class Anchor:
    """A published figure and the operating point it was measured at."""
    source: str
    hardware: str
    recipe: str
    point: Point
    per_user: float | None = None
    total: float | None = None
    at_least: bool = False  # published as "more than": a prediction above it agrees


_TP1 = dict(batch=1, context=2048, attention="tp")  # ISL 1k / OSL 2k: a mean decode context of 2k
ANCHORS = (
    Anchor("TRT-LLM blog1, 8xB200 FP4, batch 1, no MTP", "B200", "r1_fp4", Point(**_TP1), per_user=111),
    Anchor("TRT-LLM blog1, 8xB200 FP4, batch 1, MTP1 (1.92 accepted)", "B200", "r1_fp4",
           Point(**_TP1, mtp_depth=1, accepted_length=1.92), per_user=198),
    Anchor("TRT-LLM blog1, 8xB200 FP4, batch 1, MTP2 (2.58)", "B200", "r1_fp4",
           Point(**_TP1, mtp_depth=2, accepted_length=2.58), per_user=250),
    Anchor("TRT-LLM blog1 / GTC, 8xB200 FP4, batch 1, MTP3 (2.82)", "B200", "r1_fp4",
           Point(**_TP1, mtp_depth=3, accepted_length=2.82), per_user=253),
    Anchor("TRT-LLM guide, 8xB200 FP4, batch 1, MTP3", "B200", "r1_fp4",
           Point(**_TP1, mtp_depth=3, accepted_length=2.82), per_user=274.7),
    Anchor("TRT-LLM blog1, 8xB200 FP4, batch 1, MTP5 (3.01)", "B200", "r1_fp4",
           Point(**_TP1, mtp_depth=5, accepted_length=3.01), per_user=239),
    Anchor("TRT-LLM guide, 8xH200 FP8, batch 1, MTP3 (2.82 assumed)", "H200", "fp8_w8a8",
           Point(**_TP1, mtp_depth=3, accepted_length=2.82), per_user=158.1),
    Anchor("TRT-LLM guide, 8xB200 FP4 BF16 cache, DP8 EP8, concurrency 3072", "B200", "nvfp4_w4a4",
           Point(batch=3072, context=2048, attention="dp"), total=36384),
    Anchor("TRT-LLM guide, 8xB200 FP4 FP8 cache, DP8 EP8, concurrency 7168", "B200", "r1_fp4",
           Point(batch=7168, context=2048, attention="dp"), total=43146),
    Anchor("GTC 2025, 8xB200 FP4, maximum throughput (>30,000)", "B200", "r1_fp4",
           Point(batch=3072, context=2048, attention="dp"), total=30000, at_least=True),
    Anchor("TRT-LLM guide, 8xH200 FP8, DP8 EP8, concurrency 1024", "H200", "fp8_w8a8",
           Point(batch=1024, context=2048, attention="dp"), total=11489),
    Anchor("SGLang 0.5.7, 8xH200 FP8, TP8, 1k/1k, concurrency 8", "H200", "fp8_w8a8",
           Point(batch=8, context=1536, attention="tp"), per_user=78, total=597),
    Anchor("SGLang 0.5.7, 8xH200 FP8, TP8, 1k/1k, concurrency 64", "H200", "fp8_w8a8",
           Point(batch=64, context=1536, attention="tp"), per_user=29, total=1789),
)


def compare(cfg: Config, anchors=ANCHORS, efficiencies=(("ideal", IDEAL), ("calibrated", CALIBRATED))) -> list[dict]:
    """Each anchor with each efficiency's prediction and its error (prediction / published - 1)."""
    cache: dict[str, ModelBytes] = {}
    rows = []
    for an in anchors:
        mb = cache.setdefault(an.recipe, model_bytes(cfg, an.recipe))
        row = {"source": an.source, "hardware": an.hardware, "recipe": an.recipe, "batch": an.point.batch,
               "context": an.point.context, "attention": an.point.attention, "at_least": an.at_least,
               "mtp_depth": an.point.mtp_depth, "published_per_user": an.per_user, "published_total": an.total}
        for name, eff in efficiencies:
            s = decode_step(cfg, mb, HARDWARE[an.hardware], an.point, eff)
            row[f"{name}_step_ms"] = s.seconds * 1e3
            row[f"{name}_per_user"], row[f"{name}_total"] = s.tokens_per_s_user, s.tokens_per_s_total
            pub, pred = (an.per_user, s.tokens_per_s_user) if an.per_user else (an.total, s.tokens_per_s_total)
            row[f"{name}_error"] = 0.0 if an.at_least and pred >= pub else pred / pub - 1
        rows.append(row)
    return rows
