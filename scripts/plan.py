"""Plan a model on a mesh without allocating: per-device weight bytes by component, KV-cache capacity, fit.

    python scripts/plan.py                                          # 671B, the FP8 release, 8 devices of 80 GB
    python scripts/plan.py --recipe r1_fp4 --mesh expert=8 --memory-gb 180
    python scripts/plan.py --compile                                # also compile the 61-layer decode step
    python scripts/plan.py --restore --disk-gbps 2                  # restoring a converted checkpoint: bytes, time
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from model import command
from model.config import get_preset
from model.memory import compile_decode, format_plan, format_restore, plan, restore_plan
from quant.recipes import get_recipe
from sharding.mesh import make_mesh, parse_mesh_spec


def main(argv=None):
    ap = command.parser("plan", __doc__)
    ap.add_argument("--preset", default="r1_671b")
    ap.add_argument("--mesh", default="expert=8")
    ap.add_argument("--recipe", default="fp8_w8a8", help="a recipe of quant/recipes.py, modifiers included")
    ap.add_argument("--memory-gb", type=float, default=80.0)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--restore", action="store_true",
                    help="also plan restoring a converted checkpoint onto the mesh (bytes per device, time)")
    ap.add_argument("--disk-gbps", type=float, default=2.0, help="disk read bandwidth for --restore, GB/s")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=4096)
    args = ap.parse_args(argv)
    try:
        n = 1
        for v in parse_mesh_spec(args.mesh).values():
            n *= v
        cfg = get_preset(args.preset)
        get_recipe(args.recipe)
    except ValueError as e:
        ap.error(str(e))
    if args.memory_gb <= 0 or args.disk_gbps <= 0 or args.batch < 1 or args.max_len < 1:
        ap.error("--memory-gb and --disk-gbps must be positive, --batch and --max-len >= 1")
    # a plan needs no accelerator: n emulated CPU devices (set before JAX's first operation)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    mesh = make_mesh(args.mesh)
    print(format_plan(plan(cfg, mesh, recipe=args.recipe, device_memory_gb=args.memory_gb), cfg))
    if args.restore:
        print("\n" + format_restore(restore_plan(cfg, mesh, recipe=args.recipe, disk_gb_s=args.disk_gbps)))
    if args.compile:
        mem, collectives, secs = compile_decode(cfg.replace(num_nextn_predict_layers=0), mesh, batch=args.batch,
                                                max_len=args.max_len)
        print(f"\ncompiled the {cfg.num_hidden_layers}-layer decode step (batch {args.batch}, cache {args.max_len}, "
              f"bf16 weights) in {secs:.1f} s")
        if mem is not None:
            print(f"XLA memory analysis per device: arguments {mem.argument_size_in_bytes / 1e9:.2f} GB, outputs "
                  f"{mem.output_size_in_bytes / 1e9:.2f} GB, temporaries {mem.temp_size_in_bytes / 1e9:.2f} GB, "
                  f"aliased {mem.alias_size_in_bytes / 1e9:.2f} GB")
        print("collectives emitted: " + ", ".join(f"{k} x{v}" for k, v in collectives.items()))


if __name__ == "__main__":
    command.run(main)
