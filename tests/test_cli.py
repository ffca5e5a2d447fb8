"""generate.py for scripting: a prompt file run through the continuous-batching engine gives each prompt the tokens
it gets alone with its request id (greedy and seeded), as JSON lines; stop strings end the text (and the request),
streamed or not."""

import dataclasses
import json

import pytest

from model import SamplingParams, generate
from model.cli import BUNDLED_CHECKPOINT, StopStrings, cut_at_stop, generate_main, ids_through_stop, load_any

PROMPTS = ["Return the number of", "The ", "def f(x):", "12+34=", "a", "Hello world", "x = ", "import"]


def test_a_prompt_file_is_each_prompt_alone(tmp_path, capsys):
    """Text lines and JSON lines, one with its own sampling and length, one with a stop string, through the engine
    with fewer slots than requests: each request gets the tokens it gets alone with its request id (its place in
    the file); the one with a stop string ends at it."""
    own = {"temperature": 0.5, "top_k": 20, "seed": 7, "max_new_tokens": 5}
    params, cfg, tok = load_any(BUNDLED_CHECKPOINT)
    greedy = generate(params, cfg, [tok.encode(PROMPTS[3], add_bos=True)], max_new_tokens=12, request_ids=[8])
    text = tok.decode(greedy.sequences()[0])
    stop = text[4:6]  # a stop string its greedy text reaches after a few tokens
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(PROMPTS[:6]) + "\n\n" + json.dumps({"prompt": PROMPTS[6], "id": "j0"}) + "\n"
                    + json.dumps({"prompt": PROMPTS[7], "id": "j1", **own}) + "\n"
                    + json.dumps({"prompt": PROMPTS[3], "id": "s", "temperature": 0, "stop": [stop]}) + "\n")
    for flags, sp in ((["--temperature", "0"], SamplingParams(top_p=0.95)),
                      (["--temperature", "0.8", "--seed", "3"], SamplingParams(temperature=0.8, top_p=0.95, seed=3))):
        generate_main(["--prompt-file", str(file), "--json", "--max-new-tokens", "12", "--slots", "4", *flags])
        out = capsys.readouterr()
        rows = [json.loads(line) for line in out.out.splitlines()]
        assert [r["prompt"] for r in rows] == PROMPTS + PROMPTS[3:4] and rows[7]["id"] == "j1"
        assert "(4 slots)" in out.err
        for i, (p, r) in enumerate(zip(PROMPTS, rows)):
            mine, n = (dataclasses.replace(sp, **{k: own[k] for k in ("temperature", "top_k", "seed")}), 5) \
                if i == 7 else (sp, 12)
            alone = generate(params, cfg, [tok.encode(p, add_bos=True)], max_new_tokens=n, sampling=mine,
                             stop_tokens=[tok.eos_id], request_ids=[i])
            assert r["token_ids"] == alone.sequences()[0], p
            assert r["text"] == tok.decode(r["token_ids"]) and r["finish_reason"] in ("stop", "length")
        assert len(rows[7]["token_ids"]) <= 5 < len(rows[0]["token_ids"])
        s = rows[8]  # the shortest prefix of its greedy tokens whose text holds the stop string, cut before it
        assert s["finish_reason"] == "stop" and s["text"] == text[:text.index(stop)]
        assert s["token_ids"] == greedy.sequences()[0][:len(s["token_ids"])] and stop in tok.decode(s["token_ids"])
        assert s["new_tokens"] == len(s["token_ids"]) < 12


def test_stop_strings():
    assert cut_at_stop("abc STOP de", ["de", "STOP"]) == ("abc ", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    s = StopStrings(["STOP"])
    assert [s.feed(x) for x in ("ab", "cS", "TO", "Pxyz")] == ["ab", "c", "", ""] and s.hit
    s = StopStrings(["STOP"])
    assert (s.feed("abST"), s.feed("x"), s.flush()) == ("ab", "STx", "")
    s = StopStrings(["STOP"])
    assert (s.feed("abSTO"), s.flush()) == ("ab", "STO")   # the end of generation releases what was held
    decode = "".join  # ids as one-character strings
    assert ids_through_stop(list("abcSTOPdef"), decode, ["STOP", "zz"]) == list("abcSTOP")
    assert ids_through_stop(list("abc"), decode, ["STOP"]) == list("abc")


def test_bad_prompt_files_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    own, own2, own3 = (tmp_path / f"own{i}.jsonl" for i in range(3))
    own.write_text('{"prompt": "a", "temp": 1}\n')
    own2.write_text('{"prompt": "a", "top_p": 2}\n')
    own3.write_text('{"prompt": "a", "stop": "x"}\n')
    for argv, message in ((["--prompt-file", str(tmp_path / "none.txt")], "cannot read it"),
                          (["--prompt-file", str(bad)], 'line 2: a JSON line needs a "prompt" string'),
                          (["--prompt-file", str(empty)], "no prompts in it"),
                          (["--prompt-file", str(own)], "line 1: unknown field(s) ['temp']"),
                          (["--prompt-file", str(own2)], "request 0: top_p must lie in (0, 1], got 2"),
                          (["--prompt-file", str(own3)], 'line 1: "stop" must be a list of strings, got \'x\''),
                          (["--json"], "--json goes with --prompt-file"),
                          (["--prompt-file", str(empty), "--slots", "0"], "--slots must be >= 1, got 0")):
        with pytest.raises(SystemExit) as e:
            generate_main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, err


def test_a_prompt_file_on_a_mesh_with_a_batch_axis(tmp_path, capsys):
    """Three requests on data=2: the engine's slots round up to 4 and each request keeps its greedy tokens."""
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(PROMPTS[:3]) + "\n")
    generate_main(["--prompt-file", str(file), "--json", "--max-new-tokens", "6", "--temperature", "0", "--mesh",
                   "expert=4,data=2"])
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    params, cfg, tok = load_any(BUNDLED_CHECKPOINT)
    plain = generate(params, cfg, [tok.encode(p, add_bos=True) for p in PROMPTS[:3]], max_new_tokens=6,
                     stop_tokens=[tok.eos_id])
    assert [r["token_ids"] for r in rows] == plain.sequences() and "(4 slots)" in out.err
