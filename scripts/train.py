"""Train the bundled model (full DeepSeek-V3 architecture at small scale) on CPU and save it with orbax.

    python scripts/train.py                                   # about 20 minutes on 2 cores
    python scripts/train.py --steps 50 --out /tmp/ckpt        # a quick run
"""

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import get_preset  # noqa: E402
from model.training import TrainConfig  # noqa: E402
from model.trainer import train  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "model" / "bundled" / "checkpoint"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bundled")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            ap.add_argument(flag, type=type(f.default), default=f.default)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    cfg = get_preset(args.preset)
    print(f"config: {cfg}\ntraining: {tc}")
    train(cfg, tc, Path(args.out), overwrite=args.overwrite)


if __name__ == "__main__":
    main()
