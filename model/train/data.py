"""Offline training and evaluation data: real English from the Python standard library's docstrings (PSF
licence, ships with every Python) and generated arithmetic word problems with worked answers.

Held-out splits are decided by a hash of the source module (text) or of the problem (arithmetic), so they never
appear in training, whatever the seed.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import sysconfig
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from model.io.tokenizer import ByteTokenizer

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                out.append(doc.strip())
    return out


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    train: str
    heldout: str
    sha256: str
    source: str


@functools.cache  # read once per process (2.5 s on a 2-core machine); a TextCorpus is immutable
def stdlib_corpus(heldout_every: int = 20) -> TextCorpus:
    """Docstrings of the standard library's .py files (tests and tool folders excluded), sorted by path.

    A module goes to the held-out split when crc32(relative path) % heldout_every == 0 (about 5%).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if _SKIP_DIRS & set(rel.split("/")[:-1]):
            continue
        docs = _docstrings(path)
        if docs:
            (held if zlib.crc32(rel.encode()) % heldout_every == 0 else train).append(docs)
    seen = {d for docs in train for d in docs}
    # the stdlib repeats some docstrings across modules (io/_pyio, ...): a held-out one that is also trained on
    # is dropped from the held-out split, so held-out text is never seen in training
    held = [[d for d in docs if d not in seen] for docs in held]
    train_s = "\n\n".join("\n\n".join(docs) for docs in train)
    held_s = "\n\n".join("\n\n".join(docs) for docs in held if docs)
    digest = hashlib.sha256((train_s + "\0" + held_s).encode()).hexdigest()
    return TextCorpus(train_s, held_s, digest, f"docstrings of {root} (Python standard library, PSF licence)")


# ---- arithmetic word problems -------------------------------------------------------------------------------------

NAMES = ("Ann", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gia", "Hugo", "Ines", "Jon")
ITEMS = ("apples", "books", "coins", "marbles", "pens", "shells", "stamps", "cards")
KINDS = ("add2", "sub2", "add3", "mul")


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str
    a: int
    b: int
    name: str
    item: str

    @property
    def answer(self) -> int:
        return {"add2": self.a + self.b, "add3": self.a + self.b, "sub2": self.a - self.b,
                "mul": self.a * self.b}[self.kind]

    @property
    def question(self) -> str:
        n, it = self.name, self.item
        if self.kind in ("add2", "add3"):
            return f"{n} has {self.a} {it} and gets {self.b} more. How many {it} does {n} have now?"
        if self.kind == "sub2":
            return f"{n} has {self.a} {it} and gives away {self.b}. How many {it} does {n} have left?"
        return f"{n} has {self.a} boxes with {self.b} {it} each. How many {it} does {n} have?"

    @property
    def worked(self) -> str:
        """A worked answer done digit by digit from the ones up, as on paper, each step one small fact with its
        carry or borrow, ending in 'answer = <answer>' (exact match reads what follows the last '=').
        The answer is then a copy: the last step's result followed by the earlier steps' last digits."""
        a, b = self.a, self.b
        if self.kind in ("add2", "add3"):
            steps, carry = [], 0
            for p in (1, 10, 100)[:3 if self.kind == "add3" else 2]:
                x, y = a // p % 10, b // p % 10
                steps.append(f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {x + y + carry}")
                carry = (x + y + carry) // 10
            return f"{a} + {b}: " + ", ".join(steps) + f", answer = {self.answer}"
        if self.kind == "sub2":
            (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
            if a0 >= b0:
                steps = [f"{a0} - {b0} = {a0 - b0}", f"{a1} - {b1} = {a1 - b1}"]
            else:
                steps = [f"1{a0} - {b0} = {10 + a0 - b0}", f"{a1} - 1 - {b1} = {a1 - 1 - b1}"]
            return f"{a} - {b}: " + ", ".join(steps) + f", answer = {self.answer}"
        b1, b0 = divmod(b, 10)
        carry = a * b0 // 10
        steps = [f"{a} * {b0} = {a * b0}", f"{a} * {b1}" + (f" + {carry}" if carry else "") + f" = {a * b1 + carry}"]
        return f"{a} * {b}: " + ", ".join(steps) + f", answer = {self.answer}"

    def prompt(self) -> str:
        return f"{self.question}\nAnswer:"

    def text(self) -> str:
        return f"{self.prompt()} {self.worked}\n"

    @property
    def heldout(self) -> bool:
        return zlib.crc32(f"{self.kind}:{self.a}:{self.b}".encode()) % 10 == 0


def random_problem(rng: np.random.Generator, kind: str) -> Problem:
    if kind == "add2":
        a, b = rng.integers(10, 100, 2)
    elif kind == "sub2":
        a, b = sorted(rng.integers(10, 100, 2), reverse=True)
    elif kind == "add3":
        a, b = rng.integers(100, 1000, 2)
    else:
        a, b = rng.integers(2, 10), rng.integers(10, 100)
    return Problem(kind, int(a), int(b), NAMES[rng.integers(len(NAMES))], ITEMS[rng.integers(len(ITEMS))])


TRAIN_MIX = {"add2": 0.55, "sub2": 0.15, "add3": 0.1, "mul": 0.2}


def problems(rng: np.random.Generator, n: int, *, heldout: bool, kinds=KINDS) -> list[Problem]:
    """n problems from the training (heldout=False) or held-out split; kinds drawn by TRAIN_MIX weights."""
    weights = np.array([TRAIN_MIX[k] for k in kinds])
    weights = weights / weights.sum()
    out = []
    while len(out) < n:
        p = random_problem(rng, kinds[rng.choice(len(kinds), p=weights)])
        if p.heldout == heldout:
            out.append(p)
    return out


# ---- training batches ---------------------------------------------------------------------------------------------

class Batch(NamedTuple):
    tokens: np.ndarray  # [B, T+1] int32
    segments: np.ndarray  # [B, T+1] int32 document id within the row
    weights: np.ndarray  # [B, T+1] float32 loss weight of predicting each token


class Batcher:
    """Rows of seq_len + 1 tokens: a text window after <bos> (probability text_frac, one document), or arithmetic
    problems packed back to back, each '<bos> question Answer: worked answer\n' its own document, so a problem is
    seen exactly as at evaluation (position 0, no other problem in view). Worked-answer tokens get loss weight
    answer_weight. Deterministic given the seed."""

    def __init__(self, corpus: TextCorpus, tok: ByteTokenizer, seq_len: int, batch: int, seed: int,
                 text_frac: float = 0.5, answer_weight: float = 1.0):
        self.text = np.frombuffer(corpus.train.encode("utf-8"), np.uint8)
        self.tok, self.seq_len, self.batch, self.text_frac = tok, seq_len, batch, text_frac
        self.answer_weight = answer_weight
        self.rng = np.random.default_rng(seed)

    def _arith(self):
        ids, seg, wts = [], [], []
        while len(ids) < self.seq_len + 1:
            p = problems(self.rng, 1, heldout=False)[0]
            q = self.tok.encode(p.prompt(), add_bos=True)
            a = self.tok.encode(f" {p.worked}\n")
            ids += q + a
            doc = seg[-1] + 1 if seg else 0
            seg += [doc] * (len(q) + len(a))
            wts += [1.0] * len(q) + [self.answer_weight] * len(a)
        n = self.seq_len + 1
        return ids[:n], seg[:n], wts[:n]

    def _text(self):
        start = int(self.rng.integers(0, len(self.text) - self.seq_len))
        n = self.seq_len + 1
        return [self.tok.bos_id, *self.text[start:start + self.seq_len].tolist()], [0] * n, [1.0] * n

    def next_batch(self) -> Batch:
        rows = [self._text() if self.rng.random() < self.text_frac else self._arith() for _ in range(self.batch)]
        ids, seg, wts = zip(*rows)
        return Batch(np.array(ids, np.int32), np.array(seg, np.int32), np.array(wts, np.float32))
