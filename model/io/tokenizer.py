"""The tokenizer interface, the byte-level tokenizer of the bundled model, and how a checkpoint's tokenizer is found.

Interface: vocab_size, n_tokens (ids it produces), bos_id, eos_id, encode(text, add_bos=False) -> list[int],
decode(ids) -> str, check_ids(ids, what) (refuses ids it cannot produce), chat_prompt(user_text) -> list[int] (the
generation prompt), stream_decoder(), describe() -> dict (saved with checkpoints). DeepSeek-R1's own tokenizer is
model/io/hf_tokenizer.py.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from model.io import hf_tokenizer


class Tokenizer(Protocol):
    vocab_size: int
    n_tokens: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def check_ids(self, ids: Sequence[int], what: str = "token ids") -> list[int]: ...
    def stream_decoder(self): ...
    def chat_prompt(self, user_text: str) -> list[int]: ...
    def describe(self) -> dict: ...


SPECIALS = ("<bos>", "<eos>", "<pad>", "<|User|>", "<|Assistant|>", "<think>", "</think>")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; the special tokens follow (256 = <bos>, 257 = <eos>, ...).

    Round-trips any string exactly. The model's vocabulary may be larger (unused rows) than 256 + specials.
    """

    def __init__(self, vocab_size: int = 512):
        if vocab_size < 256 + len(SPECIALS):
            raise ValueError(f"a byte tokenizer needs vocab_size >= {256 + len(SPECIALS)}, got {vocab_size}")
        self.vocab_size = self.n_tokens = vocab_size
        self.special = {name: 256 + i for i, name in enumerate(SPECIALS)}
        self.bos_id, self.eos_id, self.pad_id = self.special["<bos>"], self.special["<eos>"], self.special["<pad>"]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def check_ids(self, ids: Sequence[int], what: str = "token ids") -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{what}: {bad[:8]} are outside the vocabulary [0, {self.vocab_size})")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in self.check_ids(ids) if i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """An incremental decoder: feed ids one at a time, get text as soon as it forms whole characters."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: dec.decode(bytes([i])) if 0 <= i < 256 else ""

    def chat_prompt(self, user_text: str) -> list[int]:
        s = self.special
        return [s["<bos>"], s["<|User|>"], *self.encode(user_text), s["<|Assistant|>"]]

    def describe(self) -> dict:
        return {"kind": "bytes", "vocab_size": self.vocab_size, "specials": self.special}


def tokenizer_from_description(d: dict, checkpoint_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer a checkpoint's meta.json describes (see each tokenizer's describe())."""
    if d.get("kind") == "bytes":
        return ByteTokenizer(d["vocab_size"])
    if d.get("kind") == "hf":
        if d.get("source") == hf_tokenizer.R1_PACKAGE_PIN:
            tok = hf_tokenizer.HFTokenizer.r1()
        else:
            tok = hf_tokenizer.load_from_directory(checkpoint_dir) if checkpoint_dir is not None else None
            if tok is None:
                raise hf_tokenizer.TokenizerError(f"the checkpoint's tokenizer ({d.get('source')}) needs "
                                                  f"tokenizer.json in {str(checkpoint_dir)!r}")
        if tok.sha256 != d.get("sha256"):
            raise hf_tokenizer.TokenizerError(f"the tokenizer found has sha256 {tok.sha256}, the checkpoint was "
                                              f"saved with {d.get('sha256')}")
        return tok
    raise ValueError(f"unknown tokenizer description {d!r}")


# A checkpoint directory that holds this project's description of its tokenizer (a byte tokenizer has no
# tokenizer.json): written by model/io/release.py beside a release-layout copy of one of our checkpoints.
DESCRIPTION_FILE = "r1jax_tokenizer.json"


def tokenizer_for(spec: str, vocab_size: int, checkpoint_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer named by a command line's --tokenizer: "bytes", "r1" (the pinned DeepSeek-R1 package), a
    directory holding tokenizer.json, or "auto": the checkpoint directory's own (tokenizer.json, or this project's
    description of it), refused where it has none, so that no text is ever encoded with a tokenizer the model was
    not trained with. It must fit the model: every id it produces has a row."""
    if spec == "bytes":
        tok = ByteTokenizer(vocab_size)
    elif spec == "r1":
        tok = hf_tokenizer.HFTokenizer.r1()
    elif spec == "auto":
        tok = hf_tokenizer.load_from_directory(checkpoint_dir) if checkpoint_dir is not None else None
        desc = Path(checkpoint_dir) / DESCRIPTION_FILE if checkpoint_dir is not None else None
        if tok is None and desc is not None and desc.is_file():
            tok = tokenizer_from_description(json.loads(desc.read_text()), checkpoint_dir)
        if tok is None:
            raise hf_tokenizer.TokenizerError(f"{checkpoint_dir} holds no tokenizer (no tokenizer.json): name one "
                                              f"with --tokenizer r1, bytes or a directory holding tokenizer.json")
    else:
        tok = hf_tokenizer.load_from_directory(spec)
        if tok is None:
            raise hf_tokenizer.TokenizerError(f"--tokenizer {spec!r}: expected bytes, r1, auto, or a directory "
                                              f"holding tokenizer.json")
    if tok.n_tokens > vocab_size:
        raise hf_tokenizer.TokenizerError(f"the tokenizer produces {tok.n_tokens} ids but the model has only "
                                          f"{vocab_size} embedding rows")
    return tok
