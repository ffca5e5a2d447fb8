"""DeepSeek-V3/R1 in JAX: a functional model over parameter pytrees.

Dimension letters, used in einsum strings and shape comments throughout:

| letter | meaning                                   | 671B value |
|--------|-------------------------------------------|-----------:|
| B      | batch                                     |            |
| T      | query positions (tokens in this call)     |            |
| S      | key / cache positions                     |            |
| D      | model width (hidden_size)                 | 7168       |
| N      | attention heads                           | 128        |
| H      | no-rope query/key head dim                | 128        |
| R      | rope head dim                             | 64         |
| V      | value head dim (in `wv_b`, `wo`) / vocab (in logits, `lm_head`) | 128 / 129280 |
| C      | KV latent (kv_lora_rank)                  | 512        |
| Q      | query latent (q_lora_rank)                | 1536       |
| F      | dense FFN width                           | 18432      |
| M      | expert FFN width                          | 2048       |
| E      | routed experts                            | 256        |
| X      | experts per token                         | 8          |
| L      | layers                                    | 61         |
"""

from model.cache import Cache, init_cache  # the latent cache
from model.config import PRESETS, R1_671B, SMALL, TINY, Config, RopeScaling, get_preset  # configuration
from model.engine import Engine, Request  # continuous batching
from model.forward import decode_step, prefill  # entry points
from model.generate import GenerateOutput, generate
from model.params import Params, abstract_params, init, param_counts, param_infos  # parameters
from model.placement import shard_cache, shard_params  # on a mesh
from model.plan import ExecutionPlan
from model.quantize import Calibration, calibrate, quantize_params  # precision
from model.routing import Routed, RoutingStats, routing_stats, token_mask  # what the router did
from model.sampling import SamplingParams

__all__ = [
    "Config", "RopeScaling", "R1_671B", "SMALL", "TINY", "PRESETS", "get_preset",
    "Params", "init", "abstract_params", "param_counts", "param_infos",
    "Cache", "init_cache", "ExecutionPlan", "shard_params", "shard_cache",
    "prefill", "decode_step", "generate", "GenerateOutput", "SamplingParams", "Engine", "Request",
    "Calibration", "calibrate", "quantize_params", "Routed", "RoutingStats", "routing_stats", "token_mask",
]
