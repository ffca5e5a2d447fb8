"""Convert DeepSeek's FP8 release (or any HF-layout DeepSeek-V3 directory) into this project's layered checkpoint,
one layer at a time, resumable (model/io/convert.py says how, and how much memory it takes).

    python scripts/convert.py /data/DeepSeek-R1 /data/r1-fp8
    python scripts/convert.py /data/DeepSeek-R1 /data/r1-fp4 --weights r1_fp4
    python scripts/generate.py --checkpoint /data/r1-fp8 --chat --prompt "..." --mesh expert=8

Run the same command again after an interruption: it continues where it stopped.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import command
from model.io.convert import WEIGHTS, convert
from model.io.errors import CheckpointError
from model.io.hf_tokenizer import TokenizerError


def main(argv=None):
    ap = command.parser("convert", __doc__)
    ap.add_argument("src", help="the release directory (config.json, *.safetensors, the index)")
    ap.add_argument("dst", help="the checkpoint to write (written as DST.partial, renamed when complete)")
    ap.add_argument("--dtype", default=None, help="compute dtype of the converted model (default: the config's)")
    ap.add_argument("--weights", default="fp8", choices=sorted(WEIGHTS),
                    help="fp8: the release's own codes and scales; bf16: dequantized; nvfp4: NVFP4 weights "
                    "(nvfp4_w4a16); r1_fp4: the published R1-FP4 recipe, quantized from the FP8 blocks")
    ap.add_argument("--tokenizer", default="auto", help="auto (the source's tokenizer.json, else R1's), r1, bytes, "
                    "or a directory holding tokenizer.json")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing DST (and a foreign DST.partial)")
    ap.add_argument("--no-finite-check", action="store_true", help="skip the NaN/inf check of every tensor")
    args = ap.parse_args(argv)
    try:
        out = convert(args.src, args.dst, dtype=args.dtype, weights=args.weights, overwrite=args.overwrite,
                      check_finite=not args.no_finite_check, tokenizer=args.tokenizer)
    except (CheckpointError, TokenizerError, FileExistsError, ValueError) as e:
        ap.exit(2, f"convert: error: {e}\n")
    print(out)


if __name__ == "__main__":
    command.run(main)
