"""Held-out bits per byte (with a unigram baseline), arithmetic exact match by kind, and expert load balance.

    python scripts/evaluate.py                         # the bundled checkpoint
    python scripts/evaluate.py --checkpoint DIR --json results/eval.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.cli import evaluate_command

if __name__ == "__main__":
    evaluate_command()
