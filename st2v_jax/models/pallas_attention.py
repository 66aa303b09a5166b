"""Non-causal multi-head attention through JAX's Pallas TPU splash-attention kernel, for
sequences of any length.

The kernel tiles the sequence in blocks that are multiples of the TPU's 128 lanes, so a
sequence is zero-padded to a multiple of 128 and the block is the largest multiple of 128
up to 512 that divides the padded length (1024 spatial tokens: one pad-free 512 tile pair;
200 tokens: padded to 256, one 256 tile). Padded positions form a second segment: real
queries never attend to padded keys, and the padded queries (attending only to zero keys)
are dropped. The kernel does not scale the logits, so queries are scaled by 1/sqrt(d) first.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

Array = jax.Array
LANES = 128
MAX_BLOCK = 512
# Shorter sequences run XLA's attention: padding them to a full tile would only add work.
MIN_TOKENS = LANES


def block_layout(length: int) -> tuple[int, int]:
    """(padded length, block size) for a sequence of `length` tokens."""
    padded = -(-length // LANES) * LANES
    block = max(b for b in range(LANES, MAX_BLOCK + 1, LANES) if padded % b == 0)
    return padded, block


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, padded: int, block: int, interpret: bool) -> splash.splash_attention_kernel.SplashAttentionKernel:
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.FullMask((padded, padded))] * heads)
    # Built eagerly even when first asked for inside a trace: the cached kernel holds its
    # block-mask arrays, which must be constants, not tracers of that one trace.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: Array, k: Array, v: Array, interpret: bool = False) -> Array:
    """softmax(q k^T / sqrt(d)) v for q, k, v (N, L, heads, d) -> (N, L, heads, d)."""
    n, length, heads, d = q.shape
    padded, block = block_layout(length)
    q = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
    # The kernel works on one example: (heads, L, d).
    to_kernel = lambda t: jnp.swapaxes(jnp.pad(t, ((0, 0), (0, padded - length), (0, 0), (0, 0))), 1, 2)
    segments = None
    if padded != length:
        ids = (jnp.arange(padded) >= length).astype(jnp.int32)
        segments = splash.SegmentIds(q=ids, kv=ids)
    kernel = _kernel(heads, padded, block, interpret)
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(to_kernel(q), to_kernel(k), to_kernel(v))
    return jnp.swapaxes(out, 1, 2)[:, :length]
