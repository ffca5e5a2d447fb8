"""Small shared blocks: RMSNorm and the SwiGLU MLP (dense layers and the shared expert)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.params import Mlp
from quant.qarray import activation, weight

F32 = jnp.float32


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * w, computed in float32 and cast back once (DeepSeek's numerics).

    Args: x: [..., D]; w: [D].
    """
    x32 = x.astype(F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(F32)).astype(x.dtype)


def dot(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
    """einsum with float32 accumulation, cast back to the activation dtype."""
    return jnp.einsum(spec, x, w, preferred_element_type=F32).astype(x.dtype)


def qdot(x: jax.Array, w, spec: str) -> jax.Array:
    """`dot` with a weight that may be quantized (quant.QArray): the activation is quantized as the weight's
    recipe says (W4A4/W8A8) and the weight dequantized on the fly, to x's dtype."""
    return dot(activation(x, w), weight(w, x.dtype), spec)


def swiglu(p: Mlp, x: jax.Array) -> jax.Array:
    """W2 (silu(W1 x) * W3 x). Args: x: [..., D]. Returns [..., D]."""
    with jax.named_scope("swiglu"):
        xa = activation(x, p.w1)  # gate and up share one input scale
        gate = jnp.einsum("...D,DF->...F", xa, weight(p.w1, x.dtype), preferred_element_type=F32)
        up = jnp.einsum("...D,DF->...F", xa, weight(p.w3, x.dtype), preferred_element_type=F32)
        h = (jax.nn.silu(gate) * up).astype(x.dtype)
        return qdot(h, p.w2, "...F,FD->...D")
