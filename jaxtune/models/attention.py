"""Causal attention within segments, a block of queries at a time, with a hand-written
backward pass.

- Query block i only needs keys up to its last position, so most of the masked upper
  triangle is never computed, and a block's scores stay small enough for the cache.
- The backward pass recomputes the probabilities from the saved log-sum-exp (as flash
  attention does): no [T, T] scores or probabilities are kept between passes under any
  remat policy (remat `dots` saves the output and log-sum-exp by name, ATTENTION_OUT and
  ATTENTION_LSE, and recomputes nothing here). On CPU every product is laid out so that
  XLA:CPU runs it as a fast (bf16-capable) dot, with the two transposed operands
  materialised (see matmul.py); other backends contract them directly.
Layouts inside: q [B*K, G*tq, H] (GQA: the G query heads of a kv head side by side),
k and v [B*K, tk, H], scores [B*K, G*tq, tk] on CPU, where one batch axis made the bf16 block
1.5x faster than batch axes [B, K]; on GPUs and TPUs the leading axes stay [B, K], which
tensor parallelism splits without moving data (see `causal_attention`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxtune.models import matmul
from jaxtune.models.matmul import product
from jaxtune.sharding import BATCH_AND_HEADS, constrain

NEG = jnp.finfo(jnp.float32).min


# What the backward pass needs besides q, k, v: O(T) per query, unlike the [T, T] scores.
ATTENTION_OUT, ATTENTION_LSE = "attention_out", "attention_lse"
_BATCH_THEN_HEADS = (BATCH_AND_HEADS[:-1], BATCH_AND_HEADS[-1])  # [B, K, ...]


def query_block_size(t: int) -> int:
    """Queries per attention block: at least 64, at most 16 blocks per sequence."""
    return max(64, -(-t // 16))


def _swap_last(x: jax.Array) -> jax.Array:
    """[..., a, b] -> [..., b, a], physically (a reshape-swap XLA makes as a copy)."""
    *lead, a, b = x.shape
    return jnp.swapaxes(x.reshape(*lead, a, b, 1), -3, -1).reshape(*lead, b, a)


def _bmm_keys_first(a, b):
    """[..., q, t] x [..., q, h] -> [..., t, h] (contracting queries, the first axis of `a`)."""
    if matmul.cpu_layouts():  # XLA:CPU runs it fast only from a physically transposed `a`
        return product("...tq,...qh->...th", _swap_last(a), b)
    return product("...qt,...qh->...th", a, b)


def _mask(seg_q, seg_k):
    """[B, tq, tk]: the block's queries are the last tq of the tk key positions. Made from
    the segment ids in both passes, so no quadratic mask is kept between them."""
    tq, tk = seg_q.shape[1], seg_k.shape[1]
    causal = jnp.arange(tk - tq, tk)[:, None] >= jnp.arange(tk)[None, :]
    return causal[None] & (seg_q[:, :, None] == seg_k[:, None, :])


def _scores(q, k, seg_q, seg_k, groups):
    s = product("...qh,...th->...qt", q, k)  # leading axes [B*K] or [B, K]
    *lead, gq, t = s.shape
    mask = _mask(seg_q, seg_k)
    s = jnp.where(mask[:, None, None], s.reshape(mask.shape[0], -1, groups, gq // groups, t), NEG)
    return s.reshape(*lead, gq, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _block(q, k, v, seg_q, segment_ids, groups, dtype, end):
    """softmax(q k^T + mask) v for one query block (q pre-scaled) over keys [0, end).

    k, v and segment_ids are whole sequences, sliced in here: slices taken outside would
    each be kept for the backward pass, ~8x k and v over 16 blocks. Returns `dtype`."""
    return _block_fwd(q, k, v, seg_q, segment_ids, groups, dtype, end)[0]


def _block_fwd(q, k_full, v_full, seg_q, segment_ids, groups, dtype, end):
    q, k, v = q.astype(dtype), k_full[..., :end, :].astype(dtype), v_full[..., :end, :].astype(dtype)
    s = _scores(q, k, seg_q, segment_ids[:, :end], groups)
    lse = checkpoint_name(jax.nn.logsumexp(s, axis=-1, keepdims=True), ATTENTION_LSE)
    p = jnp.exp(s - lse)
    out = checkpoint_name(product("...qt,...th->...qh", p.astype(dtype), v).astype(dtype), ATTENTION_OUT)
    return out, (q, k_full, v_full, seg_q, segment_ids, lse, out)


def _block_bwd(groups, dtype, end, residuals, d_out):
    q, k_full, v_full, seg_q, segment_ids, lse, out = residuals
    k, v = k_full[..., :end, :].astype(dtype), v_full[..., :end, :].astype(dtype)
    p = jnp.exp(_scores(q, k, seg_q, segment_ids[:, :end], groups) - lse)
    d_out_c = d_out.astype(dtype)
    d_v = _bmm_keys_first(p.astype(dtype), d_out_c)
    d_p = product("...qh,...th->...qt", d_out_c, v)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_s = (p * (d_p - delta)).astype(dtype)
    d_q = product("...qt,...th->...qh", d_s, k)
    d_k = _bmm_keys_first(d_s, q)
    rest = [(0, 0)] * (k_full.ndim - 2) + [(0, k_full.shape[-2] - end), (0, 0)]
    d_k, d_v = jnp.pad(d_k, rest).astype(k_full.dtype), jnp.pad(d_v, rest).astype(v_full.dtype)
    return d_q, d_k, d_v, None, None


_block.defvjp(_block_fwd, _block_bwd)


def causal_attention(q, k, v, segment_ids, dtype) -> jax.Array:
    """q: [B, T, K, G, H] (already scaled), k, v: [B, T, K, H], segment_ids: [B, T].

    Returns [B, T, K, G, H] in `dtype`; a position attends to earlier positions of its segment.
    """
    b, t, kh, g, h = q.shape
    block = query_block_size(t)
    if matmul.cpu_layouts():
        # One batch axis B*K (1.5x faster bf16 blocks on XLA:CPU), split over the batch axes
        # then tensor, as B and K are when each data-parallel group holds one row (without
        # this, XLA gathered every head onto every tensor-parallel device).
        lead, split = (b * kh,), (BATCH_AND_HEADS,)
    else:
        # Batch and heads stay two axes, split as the projections left them: a merged axis's
        # share is other rows and heads than a device holds once a group has several rows,
        # which cost all-to-alls of q, k, v and their gradients in every layer.
        lead, split = (b, kh), _BATCH_THEN_HEADS
    qt = constrain(jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(*lead, g, t, h), *split)  # [*lead, G, T, H]
    kt = constrain(jnp.transpose(k, (0, 2, 1, 3)).reshape(*lead, t, h), *split)  # [*lead, T, H]
    vt = constrain(jnp.transpose(v, (0, 2, 1, 3)).reshape(*lead, t, h), *split)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        q_blk = qt[..., start:end, :].reshape(*lead, g * (end - start), h)
        out = _block(q_blk, kt, vt, segment_ids[:, start:end], segment_ids, g, dtype, end)
        outs.append(out.reshape(b, kh, g, end - start, h))
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    out = constrain(out, *_BATCH_THEN_HEADS)
    return jnp.transpose(out, (0, 3, 1, 2, 4))  # [B, T, K, G, H]
