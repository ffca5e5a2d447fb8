"""Eight emulated CPU devices for every test; set before JAX initialises its backends."""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_enable_x64", False)


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Drop the compiled programs after a test module once the process holds many memory mappings. Each XLA:CPU
    executable keeps mappings of its own; over the whole suite they approach the kernel's per-process limit
    (vm.max_map_count, 65530), where a later compilation crashes. Clearing only past half of it spares the
    recompilations that clearing after every module costs."""
    yield
    maps = Path("/proc/self/maps")
    if not maps.exists() or sum(1 for _ in maps.open()) > 30_000:
        jax.clear_caches()


@pytest.fixture(scope="session")
def release(tmp_path_factory):
    """A checkpoint in exactly the layout of DeepSeek's FP8 release (preset release_tiny, with MTP): (directory,
    the tensors written by name). Shared by the loader and conversion tests."""
    from model import init
    from model.config import RELEASE_TINY
    from model.io.release import write_release
    from model.io.tokenizer import ByteTokenizer

    path = tmp_path_factory.mktemp("release") / "r1"
    params = init(RELEASE_TINY, jax.random.key(0), std="fan_in", with_mtp=True)
    tokenizer = ByteTokenizer(RELEASE_TINY.vocab_size).describe()
    return path, write_release(path, params, RELEASE_TINY, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def bundled_model():
    """The bundled trained model: (params, cfg, tokenizer), loaded once for the modules that read it."""
    from model.cli import BUNDLED_CHECKPOINT, load_any

    return load_any(BUNDLED_CHECKPOINT)


# ---- DeepSeek-V3's sizes for one layer, as abstract arrays (nothing allocated): kernel lowering and inspection --

@pytest.fixture(scope="session")
def deepseek_experts():
    """64 decode tokens x top-8 rows over 256 experts, hidden 7168, expert width 2048: bf16 and quantized stacks."""
    from pallas_kernels import arg_specs

    x, sizes = arg_specs.expert_rows(64)
    return {"x": x, "sizes": sizes, **{fmt: arg_specs.expert_weights(fmt) for fmt in ("bf16", "fp8", "nvfp4", "mxfp4")}}


@pytest.fixture(scope="session")
def deepseek_attention():
    """Absorbed decode at batch 32, 128 heads, a 4k cache (bf16, and FP8 as 16-bit words); prefill of 4k tokens."""
    from pallas_kernels import arg_specs

    return {"decode": arg_specs.decode(), "decode_fp8": arg_specs.decode(fp8=True), "prefill": arg_specs.prefill()}
