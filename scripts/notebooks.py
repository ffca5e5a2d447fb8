"""Run the notebooks of notebooks/ top to bottom, as a fresh kernel would (one namespace, in the notebook's own
directory, each cell in order, the value of a cell's last expression shown), and render each executed notebook as
markdown with its plots into docs/notebooks/. The repository keeps the notebooks with their outputs cleared.

    python scripts/notebooks.py                         # run every notebook, render into docs/notebooks/
    python scripts/notebooks.py --only routing --check  # run one, render nothing (what the tests do)
"""

import ast
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# the notebooks share this process: the eight CPU devices a notebook asks for must exist before JAX starts
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

from model import command

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def run(path: Path, figures: Path) -> list[dict]:
    """Execute the notebook's code cells; each plot it saves goes to `figures` (its R1JAX_FIGURES). Returns one
    record per cell: kind, source, and for code cells the printed text, the last expression's value (repr), the
    images that appeared and the seconds it took. An error in a cell raises, naming the notebook and the cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    old_env, old_cwd = os.environ.get("R1JAX_FIGURES"), Path.cwd()
    os.environ["R1JAX_FIGURES"] = str(figures.resolve())
    os.chdir(path.parent)
    ns: dict = {"__name__": "__main__"}
    records = []
    try:
        for i, cell in enumerate(cells(path)):
            src = _source(cell)
            if cell["cell_type"] != "code":
                records.append({"kind": cell["cell_type"], "source": src})
                continue
            before = set(figures.glob("*.png"))
            tree = ast.parse(src, f"{path.name}, cell {i}")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            out, t0 = io.StringIO(), time.perf_counter()
            with contextlib.redirect_stdout(out):
                try:
                    exec(compile(tree, f"{path.name}, cell {i}", "exec"), ns)
                    value = None if last is None else eval(
                        compile(ast.Expression(last.value), f"{path.name}, cell {i}", "eval"), ns)
                except Exception as e:
                    raise RuntimeError(f"{path.name}, cell {i}: {type(e).__name__}: {e}") from e
            records.append({"kind": "code", "source": src, "stdout": out.getvalue(),
                            "value": None if value is None else repr(value), "seconds": time.perf_counter() - t0,
                            "figures": sorted(p.name for p in set(figures.glob("*.png")) - before)})
    finally:
        os.chdir(old_cwd)
        if old_env is None:
            os.environ.pop("R1JAX_FIGURES", None)
        else:
            os.environ["R1JAX_FIGURES"] = old_env
        plt.close("all")
    return records


def render(name: str, records: list[dict], seconds: float) -> str:
    """Markdown of an executed notebook: markdown cells as written, code in fences, then its output and plots."""
    parts = [f"<!-- notebooks/{name}.ipynb, executed by scripts/notebooks.py in {seconds:.0f} s -->\n"]
    for r in records:
        if r["kind"] == "markdown":
            parts.append(r["source"] + "\n")
            continue
        if r["kind"] != "code":
            continue
        parts.append(f"```python\n{r['source']}\n```\n")
        text = r["stdout"] + (r["value"] + "\n" if r["value"] is not None else "")
        if text.strip():
            parts.append(f"```\n{text.rstrip()}\n```\n")
        parts += [f"![{f}]({f})\n" for f in r["figures"]]
    return "\n".join(parts)


def main(argv=None):
    ap = command.parser("notebooks", __doc__)
    ap.add_argument("--only", nargs="+", default=None, help="notebook names (default: all of notebooks/)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "notebooks"), help="where the rendered pages and plots go")
    ap.add_argument("--check", action="store_true", help="run only; plots go to a temporary directory")
    args = ap.parse_args(argv)
    names = args.only or sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    missing = [n for n in names if not (NOTEBOOKS / f"{n}.ipynb").exists()]
    if missing:
        ap.error(f"no notebook {missing} in {NOTEBOOKS}")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) if args.check else Path(args.out)
        for name in names:
            t0 = time.perf_counter()
            records = run(NOTEBOOKS / f"{name}.ipynb", out)
            seconds = time.perf_counter() - t0
            if not args.check:
                (out / f"{name}.md").write_text(render(name, records, seconds))
            code = [r for r in records if r["kind"] == "code"]
            print(f"{name}: {len(code)} cells in {seconds:.1f} s (slowest: "
                  + ", ".join(f"{r['seconds']:.1f}" for r in sorted(code, key=lambda r: -r["seconds"])[:3]) + " s)")


if __name__ == "__main__":
    command.run(main)
