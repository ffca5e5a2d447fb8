"""Build the HF-transformers reference fixture for tests/test_reference_parity.py (needs the `reference` extra).

A tiny random DeepSeek-V3 (YaRN on, 4 expert groups, a dense first layer, a shared expert) is built with
transformers, its weights are randomised at a scale that keeps every path active (norm weights, router bias and
all), then it computes float32 logits for prompts longer than YaRN's original context and greedy continuations.
Writes tests/fixtures/hf_tiny/{config.json, model.safetensors, reference.npz}.

    pip install -e '.[reference]' && python scripts/make_reference_fixture.py
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import command

HF_CONFIG = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
    rms_norm_eps=1e-6, max_position_embeddings=512, num_mtp_layers=0, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                         beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
)
PROMPT_LENGTHS = (320, 400)
NEW_TOKENS = 24


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights at 1/sqrt(fan_in), norms near 1, a non-zero router bias: every term of the maths matters."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def main(argv=None):
    ap = command.parser("make_reference_fixture", __doc__)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests/fixtures/hf_tiny"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = transformers.DeepseekV3Config(**HF_CONFIG)
    model = transformers.DeepseekV3ForCausalLM(cfg).to(torch.float32).eval()
    randomise(model, gen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    rng = np.random.default_rng(args.seed)
    arrays = {}
    for i, n in enumerate(PROMPT_LENGTHS):
        ids = rng.integers(2, cfg.vocab_size, size=n)
        with torch.no_grad():
            logits = model(torch.tensor(ids)[None]).logits[0].float().numpy()
            gen_ids = model.generate(torch.tensor(ids)[None], max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, n:].numpy()
        arrays[f"prompt_{i}"] = ids.astype(np.int32)
        arrays[f"logits_{i}"] = logits.astype(np.float32)
        arrays[f"greedy_{i}"] = gen_ids.astype(np.int32)
    np.savez_compressed(out / "reference.npz", **arrays)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "seed": args.seed,
            "prompt_lengths": PROMPT_LENGTHS, "new_tokens": NEW_TOKENS}
    (out / "reference_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out}: " + ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in sorted(out.iterdir())))


if __name__ == "__main__":
    command.run(main)
