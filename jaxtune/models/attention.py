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


def _query_blocks(t: int) -> tuple[tuple[int, int], ...]:
    """[start, end) of each query block; block i attends to keys [0, end_i), so the same
    bounds cut the keys into the chunks whose gradients the backward pass sums."""
    block = query_block_size(t)
    return tuple((start, min(start + block, t)) for start in range(0, t, block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(qt, kt, vt, segment_ids, groups, dtype):
    """softmax(q k^T + mask) v, a query block at a time: qt [*lead, G, T, H] (pre-scaled),
    kt, vt [*lead, T, H]; returns [*lead, G, T, H] in `dtype`.

    One custom VJP over every block, not one per block: per-block VJPs each returned
    gradients for the whole key range, zero-padded past the block's end and cast to the
    keys' dtype, which autodiff then summed (in bf16, with a round trip per block); here each
    key chunk's gradient is summed in float32 from the blocks that saw it, and cast once."""
    return _attend_fwd(qt, kt, vt, segment_ids, groups, dtype)[0]


def _attend_fwd(qt, kt, vt, segment_ids, groups, dtype):
    *lead, g, t, h = qt.shape
    k, v = kt.astype(dtype), vt.astype(dtype)
    outs, lses = [], []
    for start, end in _query_blocks(t):
        q = qt[..., start:end, :].reshape(*lead, g * (end - start), h).astype(dtype)
        s = _scores(q, k[..., :end, :], segment_ids[:, start:end], segment_ids[:, :end], groups)
        lse = checkpoint_name(jax.nn.logsumexp(s, axis=-1, keepdims=True), ATTENTION_LSE)
        p = jnp.exp(s - lse)
        out = product("...qt,...th->...qh", p.astype(dtype), v[..., :end, :]).astype(dtype)
        outs.append(checkpoint_name(out, ATTENTION_OUT))
        lses.append(lse)
    full = jnp.concatenate([o.reshape(*lead, g, -1, h) for o in outs], axis=-2)
    # q, k, v kept in `dtype`, as the products use them (float32 copies doubled these residuals),
    # with zero-size stand-ins for the dtypes their gradients must have
    protos = tuple(jnp.zeros((), x.dtype) for x in (qt, kt, vt))
    return full, (qt.astype(dtype), k, v, segment_ids, tuple(lses), tuple(outs), protos)


def _attend_bwd(groups, dtype, residuals, d_out):
    qt, k_all, v_all, segment_ids, lses, outs, (q_proto, k_proto, v_proto) = residuals
    *lead, g, t, h = qt.shape
    blocks = _query_blocks(t)
    d_k_chunks = [[] for _ in blocks]  # key chunk j: a piece from every block i >= j
    d_v_chunks = [[] for _ in blocks]
    d_qs = []
    for i, (start, end) in enumerate(blocks):
        rows = g * (end - start)
        q = qt[..., start:end, :].reshape(*lead, rows, h)
        k, v = k_all[..., :end, :], v_all[..., :end, :]
        p = jnp.exp(_scores(q, k, segment_ids[:, start:end], segment_ids[:, :end], groups) - lses[i])
        d_o = d_out[..., start:end, :].reshape(*lead, rows, h)
        d_o_c = d_o.astype(dtype)
        d_v = _bmm_keys_first(p.astype(dtype), d_o_c)
        d_p = product("...qh,...th->...qt", d_o_c, v)
        delta = jnp.sum(d_o.astype(jnp.float32) * outs[i].astype(jnp.float32), axis=-1, keepdims=True)
        d_s = (p * (d_p - delta)).astype(dtype)
        d_qs.append(product("...qt,...th->...qh", d_s, k).reshape(*lead, g, end - start, h))
        d_k = _bmm_keys_first(d_s, q)
        for j, (lo, hi) in enumerate(blocks[: i + 1]):
            d_k_chunks[j].append(d_k[..., lo:hi, :])
            d_v_chunks[j].append(d_v[..., lo:hi, :])

    def summed(chunks):
        return jnp.concatenate([functools.reduce(jnp.add, pieces) for pieces in chunks], axis=-2)

    d_q = jnp.concatenate(d_qs, axis=-2)
    return (d_q.astype(q_proto.dtype), summed(d_k_chunks).astype(k_proto.dtype),
            summed(d_v_chunks).astype(v_proto.dtype), None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def causal_attention(q, k, v, segment_ids, dtype) -> jax.Array:
    """q: [B, T, K, G, H] (already scaled), k, v: [B, T, K, H], segment_ids: [B, T].

    Returns [B, T, K, G, H] in `dtype`; a position attends to earlier positions of its segment.
    """
    b, t, kh, g, h = q.shape
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
    out = constrain(_attend(qt, kt, vt, segment_ids, g, dtype).reshape(b, kh, g, t, h), *_BATCH_THEN_HEADS)
    return jnp.transpose(out, (0, 3, 1, 2, 4))  # [B, T, K, G, H]
