"""The tokenizer interface and the byte-level tokenizer of the bundled model (the real DeepSeek-R1 tokenizer, behind
the same interface, is still to come).

Interface: vocab_size, bos_id, eos_id, encode(text, add_bos=False) -> list[int], decode(ids) -> str,
chat_prompt(user_text) -> list[int] (the R1 generation prompt), describe() -> dict (saved with checkpoints).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
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
        self.vocab_size = vocab_size
        self.special = {name: 256 + i for i, name in enumerate(SPECIALS)}
        self.bos_id, self.eos_id, self.pad_id = self.special["<bos>"], self.special["<eos>"], self.special["<pad>"]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """An incremental decoder: feed ids one at a time, get text as soon as it forms whole characters."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: dec.decode(bytes([i])) if 0 <= i < 256 else ""

    def chat_prompt(self, user_text: str) -> list[int]:
        s = self.special
        return [s["<bos>"], s["<|User|>"], *self.encode(user_text), s["<|Assistant|>"]]

    def describe(self) -> dict:
        return {"kind": "bytes", "vocab_size": self.vocab_size, "specials": self.special}


def tokenizer_from_description(d: dict) -> ByteTokenizer:
    if d.get("kind") != "bytes":
        raise ValueError(f"unknown tokenizer description {d!r}")
    return ByteTokenizer(d["vocab_size"])
