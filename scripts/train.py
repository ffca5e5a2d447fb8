"""Train the bundled model (full DeepSeek-V3 architecture at small scale) on CPU and save it with orbax.

    python scripts/train.py                                   # about 20 minutes on 2 cores
    python scripts/train.py --steps 50 --out /tmp/ckpt        # a quick run
    python scripts/train.py --init-from /tmp/ckpt --steps 300 --lr 3e-4 --out /tmp/ckpt2   # continue a checkpoint

The bundled checkpoint is two runs: the 1,700-step pre-training above, then a 300-step balance phase continued from
it (see the README, "The bundled model").
"""

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import command
from model.config import Config, get_preset
from model.io.checkpoint import read_meta
from model.io.hf_checkpoint import CheckpointError
from model.train.trainer import train
from model.train.training import TrainConfig

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "model" / "bundled" / "checkpoint"


def main(argv=None):
    ap = command.parser("train", __doc__)
    ap.add_argument("--preset", default=None,
                    help="model config (default: the checkpoint's with --init-from, else 'bundled')")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            ap.add_argument(flag, type=type(f.default), default=f.default)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    except ValueError as e:
        ap.error(str(e))
    if args.preset is None and tc.init_from:
        try:
            cfg = Config.from_dict(read_meta(tc.init_from)["config"])
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            ap.error(f"--init-from {tc.init_from}: {e}")
    else:
        try:
            cfg = get_preset(args.preset or "bundled")
        except ValueError as e:
            ap.error(str(e))
    print(f"config: {cfg}\ntraining: {tc}")
    try:
        train(cfg, tc, Path(args.out), overwrite=args.overwrite)
    except (CheckpointError, FileExistsError) as e:  # raised before any training
        ap.exit(1, f"{ap.prog}: error: {e}\n")


if __name__ == "__main__":
    command.run(main)
