"""Small shared blocks: RMSNorm and the SwiGLU MLP (dense layers and the shared expert)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.params import Mlp, OutMajorMlp
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


def rows_dot(w: jax.Array, x: jax.Array) -> jax.Array:
    """w [N, K] (output axis first), x [..., K] -> x w^T [..., N] float32, with the weight as the dot's left
    operand: XLA:CPU then runs a one-row product as W @ x over the rows of w, which reads a float32 weight faster
    than x @ W over an [in, out] one (docs/benchmarks.md, "Output-major weights")."""
    y = jax.lax.dot_general(w, x.reshape(-1, x.shape[-1]), (((1,), (1,)), ((), ())), preferred_element_type=F32)
    return y.T.reshape(*x.shape[:-1], w.shape[0])


def swiglu_out_major(p: OutMajorMlp, x: jax.Array) -> jax.Array:
    """`swiglu` of an OutMajorMlp: gate and up in one product. x: [..., D] -> [..., D] float32."""
    f = p.w2t.shape[1]
    gate_up = rows_dot(p.w13.reshape(2 * f, p.w13.shape[2]), x)  # [..., 2F]: gate, then up
    h = (jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:]).astype(x.dtype)
    return rows_dot(p.w2t, h)


def swiglu(p: Mlp | OutMajorMlp, x: jax.Array) -> jax.Array:
    """W2 (silu(W1 x) * W3 x). Args: x: [..., D]. Returns [..., D]."""
    with jax.named_scope("swiglu"):
        if isinstance(p, OutMajorMlp):
            return swiglu_out_major(p, x).astype(x.dtype)
        xa = activation(x, p.w1)  # gate and up share one input scale
        gate = jnp.einsum("...D,DF->...F", xa, weight(p.w1, x.dtype), preferred_element_type=F32)
        up = jnp.einsum("...D,DF->...F", xa, weight(p.w3, x.dtype), preferred_element_type=F32)
        h = (jax.nn.silu(gate) * up).astype(x.dtype)
        return qdot(h, p.w2, "...F,FD->...D")
