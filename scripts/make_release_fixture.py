"""Write a checkpoint in exactly the layout of DeepSeek's FP8 release (config.json with its quantization_config,
FP8 E4M3 linears with 128x128 `weight_scale_inv` blocks, BF16 embedding / head / norms / router, sharded
safetensors with their index, the MTP layer at index num_hidden_layers): what the loaders, the converter and the
tests read in place of the 671B release.

    python scripts/make_release_fixture.py /tmp/release_tiny                  # preset release_tiny, random weights
    python scripts/make_release_fixture.py /tmp/big --preset small            # any size: written layer by layer
    python scripts/make_release_fixture.py /tmp/bundled_fp8 --checkpoint model/bundled/checkpoint
    python scripts/generate.py --checkpoint /tmp/bundled_fp8                  # the bundled model, loaded as FP8

The directory must not exist yet (nothing is overwritten).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import command


def main(argv=None):
    ap = command.parser("make_release_fixture", __doc__)
    ap.add_argument("out", help="the directory to create")
    ap.add_argument("--preset", default="release_tiny", help="the config of random weights (model/config.py)")
    ap.add_argument("--checkpoint", default=None, help="write this checkpoint of the project's instead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=3, help="shards of --checkpoint's tensors (random weights: one "
                    "shard per layer, as the release)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        ap.exit(2, f"make_release_fixture: {out} already exists; choose a new directory\n")
    from model.config import get_preset
    from model.io.checkpoint import load_checkpoint
    from model.io.errors import CheckpointError
    from model.io.release import write_random_release, write_release

    try:
        if args.checkpoint:
            params, cfg, meta = load_checkpoint(args.checkpoint)
        else:
            cfg = get_preset(args.preset)
    except (CheckpointError, ValueError) as e:
        ap.exit(2, f"make_release_fixture: {e}\n")
    if args.checkpoint:
        tensors = write_release(out, params, cfg, shards=args.shards, tokenizer=meta.get("tokenizer"))
        n, size, shards = len(tensors), sum(a.nbytes for a in tensors.values()), args.shards
    else:
        info = write_random_release(out, cfg, seed=args.seed)
        n, size, shards = info["tensors"], info["bytes"], info["shards"]
    print(f"wrote {out}: {n} tensors, {size / 1e6:.1f} MB in {shards} shards")


if __name__ == "__main__":
    command.run(main)
