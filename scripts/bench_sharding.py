"""Sharded decode on 8 emulated CPU devices against 1 device, and the two expert-parallel dispatches side by side.

Emulated devices share this machine's cores, so this measures the overhead of sharding (collectives, partitioned
programs), not a speed-up. Prints a table; --json writes it.

    python scripts/bench_sharding.py --presets tiny small --json docs/bench_sharding.json
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import median_time

from model import ExecutionPlan, command, shard_cache, shard_params
from model.cache import init_cache
from model.config import get_preset
from model.forward import _decode, _prefill
from model.params import init
from sharding import make_mesh


def run(cfg, params, plan, batch, steps, repeats):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, 32)), jnp.int32)
    lengths = jnp.full((batch,), 32, jnp.int32)

    def one():
        cache = init_cache(cfg, batch, 32 + steps + 1)
        if plan.mesh is not None:
            cache = shard_cache(cache, plan.mesh)
        logits, cache = _prefill(params, cache, tokens, lengths, cfg=cfg, plan=plan)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        for _ in range(steps):
            logits, cache = _decode(params, cache, tok, cfg=cfg, plan=plan)
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
        return tok.block_until_ready()

    t = median_time(one, repeats)
    return batch * steps / t


def main(argv=None):
    ap = command.parser("bench_sharding", __doc__)
    ap.add_argument("--presets", nargs="+", default=["tiny"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for name in args.presets:
        cfg = get_preset(name)
        params = init(cfg, jax.random.key(0), std="fan_in")
        base = run(cfg, params, ExecutionPlan(), args.batch, args.steps, args.repeats)
        rows.append({"preset": name, "mesh": "1 device", "tok_s": base, "vs_1_device": 1.0})
        for spec in ("expert=8", "expert=4,tensor=2"):
            for dispatch in ("psum", "all_to_all"):
                plan = ExecutionPlan(mesh=make_mesh(spec), dispatch=dispatch)
                if dispatch == "all_to_all" and args.batch % plan.mesh.shape["expert"]:
                    continue
                tps = run(cfg, shard_params(params, cfg, plan.mesh), plan, args.batch, args.steps, args.repeats)
                rows.append({"preset": name, "mesh": f"{spec} ({dispatch})", "tok_s": tps, "vs_1_device": tps / base})
    print(f"decode, batch {args.batch}, {args.steps} steps after a 32-token prompt, host loop, median of "
          f"{args.repeats}; 8 emulated devices on {os.cpu_count()} cores (overhead, not speed-up)")
    print(f"{'preset':7} {'mesh':30} {'tok/s':>9} {'vs 1 device':>12}")
    for r in rows:
        print(f"{r['preset']:7} {r['mesh']:30} {r['tok_s']:9.1f} {r['vs_1_device']:12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    command.run(main)
