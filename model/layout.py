"""Weight layouts. The library's layout stacks layers ([L, ...]) and experts ([E, ...]) so the model scans over
layers, shards experts and compiles in the time of one layer. `unstack_layers` gives the same weights as one
buffer per layer and one per routed expert, for batch-1 decode on CPU.

Why: XLA:CPU copies any slice of a stacked buffer (dynamic or static) before a dot reads it, so a decode step
that reads each weight once also writes and re-reads it (`scripts/bench_matvec.py`: 11-21 GB/s for an expert
matrix indexed out of the stack vs 51-59 GB/s as its own buffer). With separate buffers the layers run as an
unrolled Python loop and each token's experts are picked by `lax.switch` (model/moe.py, `experts_switch`), so
every dot reads its weights in place. The latent cache goes with it as one buffer per layer (model/cache.py,
`per_layer=True`), which the unrolled layers update in place. Plain float weights of the products that dominate
a one-token step, the SwiGLU MLPs (routed experts, shared expert, dense layers) and the LM head, are stored
output axis first (`OutMajorMlp`, with gate and up as one [2, F, D] matrix; `Transposed`), so that XLA:CPU runs
each as W @ x with the weight as the left operand, which reads them faster than x @ W (docs/benchmarks.md,
"Output-major weights"); quantized weights keep their own layout. The price: compile time grows with layers x
experts, no training, and the stacked copy should be dropped by the caller to avoid holding the weights twice. The only
sharding is tensor parallelism (sharding/tp.py: `shard_unstacked`, then pass a `tensor=N` mesh), which on a CPU
with one device per core lets the cores read their slices of every weight at once. On a GPU the stacked layout is
the one to use: the Pallas grouped matmul (pallas_kernels/) reads the selected experts in place.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from model.params import Layer, Mlp, Moe, OutMajorMlp, Params, Transposed


@partial(jax.jit, static_argnums=1)
def _take(a: jax.Array, lead: int, i) -> jax.Array:
    """Slice i (row-major over the first `lead` axes) of a stack, as a new buffer; compiled once per shape."""
    return jax.lax.dynamic_index_in_dim(a.reshape(-1, *a.shape[lead:]), i, keepdims=False)


def _split(tree, counts: tuple[int, ...]) -> list:
    """A pytree whose arrays share leading axes `counts` -> prod(counts) pytrees (row-major), new buffers."""
    leaves, treedef = jax.tree.flatten(tree)
    return [treedef.unflatten([_take(a, len(counts), i) for a in leaves]) for i in range(math.prod(counts))]


def _plain(*ws) -> bool:
    return all(isinstance(w, jax.Array) for w in ws)


@jax.jit
def _out_major_mlp(m: Mlp) -> OutMajorMlp:
    return OutMajorMlp(w13=jnp.stack([m.w1.T, m.w3.T]), w2t=m.w2.T)


@jax.jit
def _out_major_expert(we1, we3, we2, i, e) -> OutMajorMlp:
    """Expert e of layer i of the [L, E, ...] stacks as new [2, F, D] (gate, up) and [D, F] buffers, read straight
    out of the stacks (no intermediate copy of a layer's experts)."""
    return _out_major_mlp(Mlp(w1=we1[i, e], w3=we3[i, e], w2=we2[i, e]))


def _mlp(m):
    return _out_major_mlp(m) if _plain(m.w1, m.w3, m.w2) else m


def _unstack(stack: Layer | None) -> tuple[Layer, ...] | None:
    if stack is None:
        return None
    n = stack.attn_norm.shape[0]
    experts = None
    if isinstance(stack.ffn, Moe):  # experts [L, E, ...] straight to L x E buffers
        f = stack.ffn
        e = jax.tree.leaves(f.we1)[0].shape[1]
        if _plain(f.we1, f.we3, f.we2):
            experts = [(tuple(_out_major_expert(f.we1, f.we3, f.we2, i, j) for j in range(e)), None, None)
                       for i in range(n)]
        else:
            split = [_split(w, (n, e)) for w in (f.we1, f.we3, f.we2)]
            experts = [tuple(tuple(w[i * e:(i + 1) * e]) for w in split) for i in range(n)]
        stack = stack.replace(ffn=f.replace(we1=None, we3=None, we2=None))
    out = []
    for i, layer in enumerate(_split(stack, (n,))):
        if experts is not None:
            we1, we3, we2 = experts[i]
            layer = layer.replace(ffn=layer.ffn.replace(we1=we1, we3=we3, we2=we2, shared=_mlp(layer.ffn.shared)))
        else:
            layer = layer.replace(ffn=_mlp(layer.ffn))
        out.append(layer)
    return tuple(out)


def is_unstacked(params: Params) -> bool:
    return isinstance(params.moe_layers, tuple) or isinstance(params.dense_layers, tuple)


def unstack_layers(params: Params) -> Params:
    """The same weights (plain or quantized) with dense_layers / moe_layers as tuples of per-layer `Layer`s, whose
    MoE experts are tuples of per-expert matrices. Plain (unquantized) SwiGLU weights, routed, shared and dense,
    become `OutMajorMlp`s (p.we1 a tuple of them, we3 = we2 = None) and a plain LM head a `Transposed` [V, D].
    Quantize first, then unstack. Accepted by prefill, decode_step and generate with the xla backend, on one
    device or tensor-parallel (sharding/tp.py)."""
    if is_unstacked(params):
        return params
    head = params.lm_head
    return params.replace(dense_layers=_unstack(params.dense_layers), moe_layers=_unstack(params.moe_layers),
                          lm_head=Transposed(jax.jit(jnp.transpose)(head)) if _plain(head) else head)
