"""What the kernels share: the Hopper target's limits, the checks every wrapper runs before lowering, bit-level
decodes that avoid the special-function units, and lowering for CUDA on a machine without a GPU.

Offsets. JAX's Triton lowering computes element offsets in 32-bit integers unless the whole operand exceeds 2^32
bytes (`_compute_offsets_from_indices`); an operand of 2^31 elements or more in 2^32 bytes or fewer therefore
wraps. Only 1-byte operands can fall in that gap (2-byte ones reach 2^32 bytes at 2^31 elements), so the
project stores FP8 codes two per 16-bit word (quant/formats.py `pack_bytes`: weights and the latent cache) and
every wrapper checks each operand with `check_offsets` before lowering: an operand that could wrap is refused by
name, never read wrongly.

Shared memory. One Hopper block has 232,448 B. `smem_bytes` of each kernel adds what Triton keeps there: every
pipelined load buffered `num_stages` times, and each dot operand that does not come straight from a load (a
dequantized weight tile, the softmax probabilities) once. The wrappers refuse block sizes over the budget.
"""

from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np

# JAX 0.11 deprecates the Triton backend and warns at every lowering; these kernels use it on purpose until their
# Mosaic GPU versions exist, and a warning turned into an error (-W error) must not stop a lowering.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)

SMEM_BYTES = 232_448  # per block on H100 / H200 (sm_90), the opt-in maximum Triton may use
NUM_SMS = 132  # H100 SXM and H200
F32 = jnp.float32


def pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def largest_tile(n: int, cap: int) -> int:
    """The largest power of two in [16, cap] dividing n (16 when none does: the shape checks then name the misfit)."""
    t = cap
    while t > 16 and n % t:
        t //= 2
    return t


def check_tile(kernel: str, name: str, value: int, minimum: int = 16) -> None:
    """Triton tiles are powers of two; dots need 16 or more along every axis."""
    if not pow2(value) or value < minimum:
        raise ValueError(f"{kernel}: {name}={value} must be a power of two >= {minimum} (Triton tiles)")


def offsets_fit(shape: tuple[int, ...], dtype) -> bool:
    """Whether JAX's Triton lowering indexes an operand of this shape and dtype without wrapping: 32-bit offsets
    reach 2^31 - 1 elements, and 64-bit ones are used only above 2^32 bytes."""
    n = int(np.prod(shape, dtype=np.int64))
    return n <= 2 ** 31 or n * jnp.dtype(dtype).itemsize > 2 ** 32


def check_offsets(kernel: str, operands: dict) -> None:
    """Refuse, by name, any operand the lowering would index with wrapping 32-bit offsets."""
    for name, x in operands.items():
        if x is not None and not offsets_fit(x.shape, x.dtype):
            raise ValueError(f"{kernel}: {name} {tuple(x.shape)} {jnp.dtype(x.dtype).name} holds 2^31 or more "
                             f"elements in 2^32 bytes or fewer, where Triton's lowering uses 32-bit offsets that "
                             f"wrap; store 1-byte codes two per 16-bit word (quant.formats.pack_bytes)")


def check_smem(kernel: str, need: int, block_sizes) -> None:
    if need > SMEM_BYTES:
        raise ValueError(f"{kernel}: {block_sizes} needs about {need:,} B of shared memory per block, over the "
                         f"{SMEM_BYTES:,} B of a Hopper block; use smaller tiles or fewer stages")


def interpret_default() -> bool:
    """Compiled on a GPU, interpret mode everywhere else."""
    return jax.default_backend() != "gpu"


def num_sms() -> int:
    """Streaming multiprocessors of the first GPU, else the H200's."""
    if jax.default_backend() == "gpu":
        return int(getattr(jax.devices()[0], "core_count", NUM_SMS) or NUM_SMS)
    return NUM_SMS


# ---- inside kernels: bit-level decodes (integer ops and a bitcast; no exp2 on the special-function units) ------

def nibbles(packed: jax.Array) -> jax.Array:
    """uint8 [..., B] -> int32 fields [..., 2B], the low nibble first (two E2M1 codes per byte). The interleave is
    a two-way stack on the last axis, which Triton lowers as a join."""
    p = packed.astype(jnp.int32)
    return jnp.stack([p & 15, p >> 4], axis=-1).reshape(*p.shape[:-1], -1)


def word_bytes(words: jax.Array) -> jax.Array:
    """uint16 words [..., W] -> int32 bytes [..., 2W], the low byte first (two FP8 codes per word)."""
    w = words.astype(jnp.int32)
    return jnp.stack([w & 255, (w >> 8) & 255], axis=-1).reshape(*w.shape[:-1], -1)


def e2m1_value(codes: jax.Array) -> jax.Array:
    """E2M1 codes (int32, 0..15) -> float32 by assembling the float's bits: sign, exponent e + 126 and the one
    mantissa bit for e > 0; 0.5 * m for the subnormal e = 0."""
    c = codes.astype(jnp.uint32)
    sign, e, m = (c >> 3) << 31, (c >> 1) & 3, c & 1
    normal = ((e + 126) << 23) | (m << 22)
    bits = sign | jnp.where(e == 0, m * jnp.uint32(0x3F000000), normal)
    return jax.lax.bitcast_convert_type(bits, F32)


def e4m3_codes(codes: jax.Array) -> jax.Array:
    """E4M3 bit patterns (int32, 0..255) -> float8_e4m3fn by a same-width bitcast (the conversion to bf16 that
    follows is the hardware's)."""
    return jax.lax.bitcast_convert_type(codes.astype(jnp.uint8), jnp.float8_e4m3fn)


def e8m0_value(codes: jax.Array) -> jax.Array:
    """E8M0 bytes -> float32 2^(b - 127) by placing b in the exponent field; b = 0 (2^-127, a subnormal that XLA
    flushes to zero) reads as 0 and 0xFF as NaN."""
    b = codes.astype(jnp.uint32)
    v = jax.lax.bitcast_convert_type(b << 23, F32)
    return jnp.where(b == 255, jnp.nan, v)


# ---- lowering for CUDA without a GPU --------------------------------------------------------------------------

@contextlib.contextmanager
def cuda_target(device_kind: str = "NVIDIA H200", cores: int = NUM_SMS):
    """Lower for CUDA on a machine without a GPU. JAX 0.11 asks the device for its compute capability and needs
    an abstract one here; 0.10 fell back to sm_90 and accepts the same context. A no-op where a GPU is present."""
    if jax.default_backend() == "gpu":
        yield
        return
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    device = AbstractDevice(device_kind=device_kind, num_cores=cores, platform="cuda")
    mesh = AbstractMesh((1,), ("_gpu",), (AxisType.Explicit,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def lower_for_cuda(fn, *args):
    """jax.jit(fn) lowered for CUDA from abstract (or concrete) arguments: the Triton kernels inside are lowered
    to Triton IR, which fails on anything the Triton backend does not support."""
    with cuda_target():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
