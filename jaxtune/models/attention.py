"""Causal attention within segments, a block of queries at a time, with a hand-written
backward pass.

- Query block i only needs keys up to its last position, so most of the masked upper
  triangle is never computed, and a block's scores stay small enough for the cache.
- The backward pass recomputes the probabilities from the saved log-sum-exp (as flash
  attention does): no [T, T] probabilities are kept between passes, whatever the remat
  policy, and every product is laid out so that XLA:CPU runs it as a fast (bf16-capable)
  dot, with the two transposed operands materialised (see matmul.py).
Layouts inside: q [B*K, G*tq, H] (GQA: the G query heads of a kv head side by side),
k and v [B*K, tk, H], scores [B*K, G*tq, tk]; one batch axis made the bf16 block 1.5x
faster on XLA:CPU than batch axes [B, K].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxtune.sharding import BATCH_AND_HEADS, constrain

NEG = jnp.finfo(jnp.float32).min


_BATCH_THEN_HEADS = (BATCH_AND_HEADS[:-1], BATCH_AND_HEADS[-1])  # [B, K, ...]


def query_block_size(t: int) -> int:
    """Queries per attention block: at least 64, at most 16 blocks per sequence."""
    return max(64, -(-t // 16))


def _swap_last(x: jax.Array) -> jax.Array:
    """[..., a, b] -> [..., b, a], physically (a reshape-swap XLA makes as a copy)."""
    *lead, a, b = x.shape
    return jnp.swapaxes(x.reshape(*lead, a, b, 1), -3, -1).reshape(*lead, b, a)


def _bmm(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _scores(q, k, mask, groups):
    s = _bmm("bqh,bth->bqt", q, k)  # b = B*K
    bk, gq, t = s.shape
    b = mask.shape[0]
    s = jnp.where(mask[:, None, None], s.reshape(b, bk // b, groups, gq // groups, t), NEG)
    return s.reshape(bk, gq, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _block(q, k, v, mask, groups, dtype):
    """softmax(q k^T + mask) v for one query block; q pre-scaled. Returns `dtype`."""
    return _block_fwd(q, k, v, mask, groups, dtype)[0]


def _block_fwd(q, k, v, mask, groups, dtype):
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    s = _scores(q, k, mask, groups)
    lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
    p = jnp.exp(s - lse)
    out = _bmm("bqt,bth->bqh", p.astype(dtype), v).astype(dtype)
    return out, (q, k, v, mask, lse, out)


def _block_bwd(groups, dtype, residuals, d_out):
    q, k, v, mask, lse, out = residuals
    p = jnp.exp(_scores(q, k, mask, groups) - lse)
    d_out_c = d_out.astype(dtype)
    d_v = _bmm("btq,bqh->bth", _swap_last(p.astype(dtype)), d_out_c)
    d_p = _bmm("bqh,bth->bqt", d_out_c, v)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_s = (p * (d_p - delta)).astype(dtype)
    d_q = _bmm("bqt,bth->bqh", d_s, k)
    d_k = _bmm("btq,bqh->bth", _swap_last(d_s), q)
    return d_q, d_k, d_v, None


_block.defvjp(_block_fwd, _block_bwd)


def causal_attention(q, k, v, segment_ids, dtype) -> jax.Array:
    """q: [B, T, K, G, H] (already scaled), k, v: [B, T, K, H], segment_ids: [B, T].

    Returns [B, T, K, G, H] in `dtype`; a position attends to earlier positions of its segment.
    """
    b, t, kh, g, h = q.shape
    block = query_block_size(t)
    # B*K splits over the batch axes then tensor, as B and K did (without this, XLA
    # gathered every head onto every tensor-parallel device).
    qt = constrain(jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b * kh, g, t, h), BATCH_AND_HEADS)  # [B*K, G, T, H]
    kt = constrain(jnp.transpose(k, (0, 2, 1, 3)).reshape(b * kh, t, h), BATCH_AND_HEADS)  # [B*K, T, H]
    vt = constrain(jnp.transpose(v, (0, 2, 1, 3)).reshape(b * kh, t, h), BATCH_AND_HEADS)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        causal = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        mask = causal[None] & (segment_ids[:, start:end, None] == segment_ids[:, None, :end])
        q_blk = qt[:, :, start:end].reshape(b * kh, g * (end - start), h)
        out = _block(q_blk, kt[:, :end], vt[:, :end], mask, g, dtype)
        outs.append(out.reshape(b, kh, g, end - start, h))
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    out = constrain(out, *_BATCH_THEN_HEADS)
    return jnp.transpose(out, (0, 3, 1, 2, 4))  # [B, T, K, G, H]
