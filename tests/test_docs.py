"""Every fenced Python block of the README, the docs and the folder READMEs, and every indented example of the
package docstrings, runs as written (each in a fresh namespace, on the test machine's 8 CPU devices)."""

import ast
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("*/README.md"))]
PACKAGES = ("model", "sharding", "quant", "pallas_kernels")


def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def docstring_examples(text: str) -> list[str]:
    """Indented blocks (4 spaces, after a blank line) of a module docstring."""
    doc = ast.get_docstring(ast.parse(text)) or ""
    return [textwrap.dedent(b) for b in re.findall(r"(?:^|\n)\n((?:    .*\n?)+)", doc)]


def _cases():
    for page in PAGES:
        for i, block in enumerate(fenced_blocks(page.read_text())):
            yield pytest.param(block, id=f"{page.relative_to(ROOT)}#{i}")
    for pkg in PACKAGES:
        for i, block in enumerate(docstring_examples((ROOT / pkg / "__init__.py").read_text())):
            yield pytest.param(block, id=f"{pkg}/__init__.py#{i}")


@pytest.mark.parametrize("code", list(_cases()))
def test_example_runs(code):
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})


def test_the_extraction_finds_what_it_should():
    """The twin: a page with a fenced block and a docstring with an indented example are both found."""
    assert fenced_blocks("text\n```python\nx = 1\n```\n```bash\nls\n```\n") == ["x = 1\n"]
    assert docstring_examples('"""Title.\n\n    y = 2\n    z = y\n\nmore\n"""\n') == ["y = 2\nz = y\n"]
    assert len(list(_cases())) >= 5
