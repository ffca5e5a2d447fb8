"""Bad input at the public boundaries, gathered in one table each: every case is refused before any compilation,
with a message that names the problem (the parameter, the prompt, the flag)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from model import generate
from model.cli import BUNDLED_CHECKPOINT, generate_main
from model.config import BUNDLED
from model.generate import NonFiniteError
from model.io.checkpoint import load_checkpoint, save_checkpoint
from model.io.errors import CheckpointError
from model.io.tokenizer import ByteTokenizer
from model.sampling import SamplingParams
from sharding.mesh import make_mesh

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


def test_a_nan_weight_is_named_on_load_and_stops_generation(nan_checkpoint, capsys):
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
