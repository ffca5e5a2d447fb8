"""The one model configuration: a frozen dataclass whose fields are named as in DeepSeek's `config.json`.

`Config.from_json(path)` loads a real DeepSeek-V3/R1 `config.json` (old `rope_scaling` or transformers-5
`rope_parameters` spelling); presets `R1_671B`, `SMALL` and `TINY` define complete models with no flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """YaRN parameters (`rope_scaling` in config.json). Only `type == "yarn"` is supported."""

    type: str = "yarn"
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self):
        if self.type != "yarn":
            raise ValueError(f"rope_scaling type {self.type!r} is not supported; only 'yarn' is")
        if self.factor < 1:
            raise ValueError(f"rope_scaling factor must be >= 1, got {self.factor}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """DeepSeek-V3/R1 architecture. Field names follow DeepSeek's config.json; `dtype` is ours (torch_dtype)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    max_position_embeddings: int = 163840
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int = 0
    eos_token_id: int = 1
    initializer_range: float = 0.02
    dtype: str = "bfloat16"

    def __post_init__(self):
        problems = []
        positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group")
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            problems.append(f"first_k_dense_replace={self.first_k_dense_replace} must lie in "
                            f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if self.n_group > 0 and self.n_routed_experts % self.n_group:
            problems.append(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            problems.append(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.n_group > 0 and not problems:
            per_group = self.n_routed_experts // self.n_group
            if per_group < 2:
                problems.append(f"each group needs >= 2 experts (group score = sum of its top-2), got {per_group}")
            if self.num_experts_per_tok > self.topk_group * per_group:
                problems.append(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the "
                                f"{self.topk_group} selected groups x {per_group} experts they can supply")
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotated in pairs)")
        if self.scoring_func != "sigmoid" or self.topk_method != "noaux_tc":
            problems.append(f"only scoring_func='sigmoid' with topk_method='noaux_tc' is supported, got "
                            f"{self.scoring_func!r}/{self.topk_method!r}")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.num_nextn_predict_layers not in (0, 1):
            problems.append(f"num_nextn_predict_layers must be 0 or 1, got {self.num_nextn_predict_layers}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.tie_word_embeddings:
            problems.append("tie_word_embeddings=True is not supported (DeepSeek-V3/R1 unties them)")
        if problems:
            raise ValueError("invalid Config: " + "; ".join(problems))

    # ---- derived values -------------------------------------------------------------------------------------
    @cached_property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @cached_property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @cached_property
    def param_dtype(self):
        return DTYPES[self.dtype]

    @cached_property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 when YaRN is on (as HF's DeepseekV3Attention and DeepSeek's own
        inference code do)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    # ---- construction ---------------------------------------------------------------------------------------
    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> Config:
        """Build from a config.json dict; unknown keys are ignored (they do not change the architecture)."""
        d = dict(d)
        rope = d.pop("rope_scaling", None) or d.pop("rope_parameters", None)
        kwargs: dict[str, Any] = {}
        if rope is not None:
            rope = dict(rope)
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope.pop("rope_theta")
            kind = rope.pop("type", None) or rope.pop("rope_type", "default")
            if kind == "default":
                kwargs["rope_scaling"] = None
            else:
                fields = {f.name for f in dataclasses.fields(RopeScaling)}
                kwargs["rope_scaling"] = RopeScaling(type=kind, **{k: v for k, v in rope.items() if k in fields})
        else:
            kwargs["rope_scaling"] = None
        if "torch_dtype" in d and "dtype" not in d:
            d["dtype"] = d["torch_dtype"]
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling"}
        kwargs.update({k: v for k, v in d.items() if k in names and v is not None})
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()), **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---- presets: complete models, no flags needed ------------------------------------------------------------------

R1_671B = Config()  # DeepSeek-V3 / R1, exactly the released config.json values.

# About 0.8B parameters: the CPU benchmark model (hidden 1024, 8 layers, 64 experts, top-4).
SMALL = Config(
    vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
    num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, n_shared_experts=1,
    num_experts_per_tok=4, n_group=8, topk_group=4,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=1024),
    max_position_embeddings=4096, dtype="float32",
)

# Fast on CPU, yet with every architectural feature: 4 expert groups, a dense first layer, a shared expert, YaRN
# on with a short original context (128) so that prompts of a few hundred tokens exercise the scaled frequencies.
TINY = Config(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=4, n_group=4, topk_group=2,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=128),
    max_position_embeddings=512, dtype="float32",
)

# The model trained here and bundled as the default checkpoint (scripts/train.py): byte-level vocabulary (256 bytes
# + specials, padded to 512), 16 experts in 4 groups, a dense first layer, a shared expert, YaRN on, MTP depth 1.
BUNDLED = Config(
    vocab_size=512, hidden_size=192, intermediate_size=512, moe_intermediate_size=96,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=4, n_group=4, topk_group=2,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=256),
    max_position_embeddings=1024, num_nextn_predict_layers=1, bos_token_id=256, eos_token_id=257,
    dtype="float32",
)

# The smallest model with R1's head dims (128 / 64 / 128): every rule of the FP8 release's 128x128 tiles happens
# in it (kv_b_proj's key and value halves on whole tiles, partial edge tiles in the MLPs and the experts). The
# release-layout fixtures are written in it (scripts/make_release_fixture.py).
RELEASE_TINY = Config(
    vocab_size=512, hidden_size=256, intermediate_size=320, moe_intermediate_size=192,
    num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=192, kv_lora_rank=128,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=4, n_shared_experts=1,
    num_experts_per_tok=2, n_group=2, topk_group=1,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=128),
    max_position_embeddings=512, num_nextn_predict_layers=1, dtype="float32",
)

PRESETS = {"r1_671b": R1_671B, "671b": R1_671B, "small": SMALL, "tiny": TINY, "bundled": BUNDLED,
           "release_tiny": RELEASE_TINY}


def get_preset(name: str) -> Config:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
