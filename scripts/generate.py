"""Generate text with streaming output and a one-line summary (also installed as `r1jax-generate`).

    python scripts/generate.py                                 # the bundled checkpoint, a default prompt
    python scripts/generate.py --prompt "..." --max-new-tokens 64 --temperature 0.6 --top-p 0.95 --seed 1
    python scripts/generate.py --checkpoint DIR                # this project's checkpoint or an HF-layout dir
    python scripts/generate.py --checkpoint DIR --chat --prompt "..."   # R1's chat format, with DIR's tokenizer
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.cli import generate_command

if __name__ == "__main__":
    generate_command()
