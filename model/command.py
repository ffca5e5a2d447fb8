"""The conventions every command-line tool of scripts/ follows, in one place.

    ap = command.parser("r1jax-plan", __doc__)      # argparse with defaults in --help and a --debug flag
    ...
    if __name__ == "__main__":
        command.run(main)                           # main(argv) does the work

- A usage error (a bad flag, file, checkpoint or setting) is one `PROG: error: ...` line and exit status 2
  (argparse's `ap.error`, or `ap.exit(USAGE, ...)` where the tool finds it after parsing).
- A failure while running (an exception the tool did not foresee, non-finite logits) is one line naming the
  exception, and exit status 1. `--debug` prints the full traceback instead.
- A closed output pipe (`| head`) ends the tool quietly, exit status 0: the reader asked for no more.
- Ctrl-C is one `interrupted` line and exit status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

USAGE, FAILURE, INTERRUPTED = 2, 1, 130


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag's help; the description printed as written (the scripts' docstrings)."""


def parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with the tools' help format and `--debug`."""
    ap = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter)
    ap.add_argument("--debug", action="store_true", help="on a failure, print the full traceback (not one line)")
    return ap


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush into a closed pipe cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None, prog: str | None = None):
    """Run main(argv) under the conventions above; exits with the status main returns (0 for None)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.splitext(os.path.basename(sys.argv[0]))[0] or "r1jax"
    try:
        status = main(argv)
        sys.stdout.flush()  # inside the try: a reader gone before the last write is a closed pipe, not a crash
    except SystemExit:
        raise
    except BrokenPipeError:
        _quiet_stdout()
        sys.exit(0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except Exception as e:
        if "--debug" in argv:
            raise
        print(f"{prog}: error: {one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(FAILURE)
    sys.exit(status if isinstance(status, int) else 0)
