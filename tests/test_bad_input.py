"""Bad input at the public boundaries, gathered in one table each: every case is refused before any compilation,
with a message that names the problem (the parameter, the prompt, the flag)."""

import importlib.util
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import calibrate, generate, quantize_params
from model.cli import BUNDLED_CHECKPOINT, evaluate_main, generate_main
from model.config import BUNDLED, TINY
from model.generate import NonFiniteError
from model.io.checkpoint import load_checkpoint, save_checkpoint
from model.io.errors import CheckpointError
from model.io.tokenizer import ByteTokenizer
from model.params import abstract_params
from model.sampling import SamplingParams
from model.train.training import TrainConfig
from sharding.mesh import make_mesh

ROOT = Path(__file__).resolve().parents[1]

SAMPLING = [
    (dict(temperature=math.nan), r"temperature must be a finite number, got nan"),
    (dict(temperature=math.inf), r"temperature must be a finite number, got inf"),
    (dict(temperature="0.6"), r"temperature must be a finite number, got '0.6'"),
    (dict(temperature=True), r"temperature must be a finite number, got True"),
    (dict(temperature=-0.1), r"temperature must be >= 0, got -0.1"),
    (dict(top_p=math.nan), r"top_p must be a finite number, got nan"),
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\], got 1.5"),
    (dict(top_k=2.5), r"top_k must be an integer, got 2.5"),
    (dict(top_k=-1), r"top_k must be >= 0, got -1"),
    (dict(seed=0.5), r"seed must be an integer, got 0.5"),
]


@pytest.mark.parametrize("kwargs, message", SAMPLING, ids=[str(k) for k, _ in SAMPLING])
def test_sampling_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


GENERATE = [
    (dict(prompts=[[5, 6.5]]), r"prompt 0 token ids must be integers, got dtype float64"),
    (dict(prompts=[[5, 6], [7, 512]]), r"prompt 1 token ids out of the vocabulary \[0, 512\): \[512\]"),
    (dict(prompts=[[5], []]), r"prompt 1 is empty"),
    (dict(prompts=[[5]], stop_tokens=257), r"stop_tokens must be a list of token ids, got 257"),
    (dict(prompts=[[5]], stop_tokens=[257.0]), r"stop token ids must be integers, got dtype float64"),
    (dict(prompts=[[5]], stop_tokens=[-1]), r"stop token ids out of the vocabulary \[0, 512\): \[-1\]"),
    (dict(prompts=[[5]], max_new_tokens=2.5), r"max_new_tokens must be an integer >= 0, got 2.5"),
    (dict(prompts=[[5]], max_new_tokens=-1), r"max_new_tokens must be an integer >= 0, got -1"),
    (dict(prompts=[[5]], sampling={"temperature": 0.6}), r"sampling must be a SamplingParams, got dict"),
]


@pytest.mark.parametrize("kwargs, message", GENERATE, ids=[str(k) for k, _ in GENERATE])
def test_generate_arguments(kwargs, message):
    # refused before the parameters are used: no compilation, no weights needed
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(None, BUNDLED, **kwargs)


def test_mesh_specs():
    for spec, message in (({"exprt": 2}, r"unknown mesh axes \['exprt'\]"), ("expert=two", "needs an integer size"),
                          ("tensr=2", "unknown mesh axis 'tensr'"), ("expert=0", "must be >= 1")):
        with pytest.raises(ValueError, match=message):
            make_mesh(spec)


COMMAND_LINE = [
    (["--temperature", "-1"], "sampling: temperature must be >= 0, got -1.0"),
    (["--temperature", "nan"], "sampling: temperature must be a finite number, got nan"),
    (["--top-p", "0"], r"sampling: top_p must lie in (0, 1], got 0.0"),
    (["--prompt", "a\udc80b"], "--prompt is not valid text: surrogates not allowed at character 1"),
    (["--max-new-tokens", "-2"], "--max-new-tokens must be >= 0, got -2"),
    (["--checkpoint", str(BUNDLED_CHECKPOINT / "meta.json")], "is a file: give the directory that holds it"),
]


@pytest.mark.parametrize("argv, message", COMMAND_LINE, ids=[a[0] for a, _ in COMMAND_LINE])
def test_generate_command_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        generate_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err
    assert np.sum([line.startswith("r1jax-generate: error") for line in err.splitlines()]) == 1


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        generate_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.6)" in out and "(default: bf16)" in out


PROMPT = "Return"


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory):
    """The bundled model with NaN in the embedding row of the first token it generates after PROMPT (a space,
    which PROMPT lacks): the prefill is finite, the first decode step is not."""
    params, cfg, meta = load_checkpoint(BUNDLED_CHECKPOINT)
    prompt = ByteTokenizer(cfg.vocab_size).encode(PROMPT, add_bos=True)
    first = generate(params, cfg, [prompt], max_new_tokens=1).tokens[0, 0]
    assert first not in prompt
    bad = params.replace(embed=params.embed.at[first].set(jnp.nan))
    path = save_checkpoint(tmp_path_factory.mktemp("nan") / "ckpt", bad, cfg, tokenizer=meta["tokenizer"])
    return path, cfg, prompt


def test_a_nan_weight_is_named_on_load_and_stops_generation(nan_checkpoint, capsys, tmp_path):
    path, cfg, prompt = nan_checkpoint
    with pytest.raises(CheckpointError, match=r"weight \.embed holds NaN or inf"):
        load_checkpoint(path)
    params, _, _ = load_checkpoint(path, check_finite=False)
    with pytest.raises(NonFiniteError, match="at generation step 1 of prompt 0"):
        generate(params, cfg, [prompt], max_new_tokens=8)
    for argv, code, message in ((["--checkpoint", str(path)], 2, "weight .embed holds NaN or inf"),
                                (["--checkpoint", str(path), "--no-finite-check", "--temperature", "0", "--prompt",
                                  PROMPT], 1,
                                 "non-finite logits (NaN or inf) at generation step 1")):
        with pytest.raises(SystemExit) as e:
            generate_main(argv)
        err = capsys.readouterr().err
        assert e.value.code == code and message in err and "Traceback" not in err, err
    # through the engine: the request is named, and the others are printed first
    file = tmp_path / "p.jsonl"
    file.write_text(json.dumps({"prompt": PROMPT, "max_new_tokens": 1}) + "\n" + json.dumps({"prompt": PROMPT}) + "\n")
    with pytest.raises(SystemExit) as e:
        generate_main(["--checkpoint", str(path), "--no-finite-check", "--temperature", "0", "--prompt-file",
                       str(file), "--json", "--max-new-tokens", "8"])
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert e.value.code == 1 and "Traceback" not in out.err
    assert "request 1 (1): non-finite logits (NaN or inf) at generation step 1" in out.err
    assert rows[0]["finish_reason"] == "length" and rows[1]["finish_reason"] == "error" and "error" in rows[1]


TRAINING = [
    (dict(steps=0), r"steps must be >= 1, got 0"),
    (dict(lr=-1.0), r"lr must be >= 0, got -1.0"),
    (dict(lr=math.nan), r"lr must be a finite number, got nan"),
    (dict(batch=2.5), r"batch must be a finite integer, got 2.5"),
    (dict(seq_len=1), r"seq_len must be >= 2, got 1"),
    (dict(text_frac=1.5), r"text_frac must be >= 0 and <= 1, got 1.5"),
    (dict(clip=0.0), r"clip must be > 0, got 0.0"),
]


@pytest.mark.parametrize("kwargs, message", TRAINING, ids=[str(k) for k, _ in TRAINING])
def test_training_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_calibration_batches_and_recipes():
    params = None  # refused before the parameters are used
    for seqs, message in (([], "at least one sequence"), ([[5, 6], []], r"sequence 1 must be a non-empty list"),
                          (np.zeros((2, 3, 4), np.int32), r"sequence 0 must be a non-empty list of token ids, got "
                                                          r"shape \(3, 4\)"),
                          ([[5, 600]], r"calibration sequence 0 token ids out of the vocabulary \[0, 512\)")):
        with pytest.raises(ValueError, match=message):
            calibrate(params, BUNDLED, seqs)
    cfg = TINY.replace(moe_intermediate_size=24)  # NVFP4 blocks 16 elements of the reduction axis
    with pytest.raises(ValueError, match=r"recipe 'nvfp4_w4a16' cannot quantize \.moe_layers\.ffn\.we2 "
                                         r"\(2, 16, 24, 64\) \[layers, experts, expert_ffn, embed\]: the reduction "
                                         r"axis \(24\) must be a multiple of the 16-element block"):
        jax.eval_shape(lambda p: quantize_params(p, cfg, "nvfp4_w4a16"), abstract_params(cfg))


def test_training_and_evaluation_command_lines(capsys):
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    for main, argv, message in ((train_script.main, ["--lr", "-1"], "lr must be >= 0, got -1.0"),
                                (train_script.main, ["--steps", "0"], "steps must be >= 1, got 0"),
                                (evaluate_main, ["--text-bytes", "1000"], "--text-bytes must be >= 2048"),
                                (evaluate_main, ["--problems", "0"], "--problems must be >= 1, got 0")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, err


TOOLS = sorted(p.stem for p in (ROOT / "scripts").glob("*.py") if "__main__" in p.read_text())


def _script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_tool_takes_the_conventions(capsys):
    """Every script with a main runs under model/command.py: --debug and defaults in --help, a bad flag is a
    one-line usage error with status 2."""
    assert {"generate", "evaluate", "train", "plan", "convert", "bench_decode", "gpu_check"} <= set(TOOLS)
    for name in TOOLS:
        tail = (ROOT / "scripts" / f"{name}.py").read_text().split('if __name__ == "__main__":')[1]
        assert tail.strip() in ("command.run(main)", f"{name}_command()"), name
        if name == "make_reference_fixture" and importlib.util.find_spec("torch") is None:
            continue
        main = {"generate": generate_main, "evaluate": evaluate_main}.get(name) or _script(name).main
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and "--debug" in out and "(default:" in out, (name, out)
        with pytest.raises(SystemExit) as e:
            main(["--no-such-flag"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and ": error: " in err.splitlines()[-1] and "Traceback" not in err, (name, err)


def test_failures_are_one_line_unless_debug(capsys):
    from model.command import FAILURE, INTERRUPTED, run

    def fails(argv):
        raise RuntimeError("the disk is full\nsecond line")

    def interrupted(argv):
        raise KeyboardInterrupt

    for main, argv, code, message in ((fails, [], FAILURE, "tool: error: RuntimeError: the disk is full (--debug "),
                                      (interrupted, [], INTERRUPTED, "tool: interrupted"),
                                      (lambda argv: 3, [], 3, ""), (lambda argv: None, [], 0, "")):
        with pytest.raises(SystemExit) as e:
            run(main, argv, "tool")
        err = capsys.readouterr().err
        assert e.value.code == code and message in err and "Traceback" not in err and "second" not in err
    with pytest.raises(RuntimeError, match="the disk is full"):  # --debug: the exception itself, traceback and all
        run(fails, ["--debug"], "tool")


def test_a_closed_output_pipe_ends_a_tool_quietly():
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "plan.py"), "--preset", "tiny", "--mesh", "expert=1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.close()  # the reader is gone before the first line
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
