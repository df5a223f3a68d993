"""Next-token cross-entropy fused with the lm head, a chunk of positions at a time.

The lm head and the loss are where the memory and much of the time go: logits for a
whole batch are `[B*T, vocab]` in float32 (4 GiB for 8k tokens of Llama 3). The fused
loss computes, per chunk of positions, the logits, the loss and already their gradients
(softmax - one_hot), and keeps only `d hidden` and `d kernel`: no logits are stored for
the backward pass and nothing is recomputed. `chunk_len=0` is one chunk.

With several chunks, each row's trained positions (nonzero weight) are moved to the front
first and only the chunks that hold any are computed: in SFT data most positions are
prompt or padding and train nothing (84% in the demo's data), and they then cost no lm
head. The result is the same up to the order of the float32 sums.

With tied embeddings the kernel is the transposed embedding, and autodiff transposes its
gradient back. XLA:CPU folds that transpose into the bf16 product that makes the gradient and
then cannot run it ("Unsupported element type for DotThunk"), so on CPU that one product is
computed in float32 (`tied=True`). On CPU the kernel's gradient is made from a transposed
copy of the hidden states (see models/matmul.py); other backends contract them directly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxtune.models import matmul
from jaxtune.models.matmul import product, transpose_2d


def _trained_first(weights):
    """Per row, the positions with a nonzero weight first (stable), and the inverse order."""
    order = jnp.argsort(weights == 0, axis=1, stable=True)
    return order, jnp.argsort(order, axis=1)


def _take(x, order):
    """x [B, T, ...] reordered along T, row by row (the batch axis keeps its sharding)."""
    return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)


def _chunks_with_training(weights, chunk_len):
    """How many leading chunks hold a trained position once each row is `_trained_first`."""
    most = jnp.max(jnp.sum(weights != 0, axis=1))
    return (most + chunk_len - 1) // chunk_len


def _over_trained_chunks(fn, init, hidden, targets, weights, chunk_len):
    """Fold `fn(carry, start, h, tgt, w)` over the chunks of `chunk_len` positions that hold
    a trained position, after moving each row's trained positions to the front.

    Positions that train nothing (prompt tokens, padding) then cost no lm head at all
    unless they share a chunk with trained ones. Returns the carry and the order that puts
    a reordered [B, T, ...] array back (`_take(x, inverse)`).
    """
    if hidden.shape[1] % chunk_len:  # the last chunk's slice would be moved back and count positions twice
        raise ValueError(f"chunk_len {chunk_len} must divide the sequence length {hidden.shape[1]}")
    order, inverse = _trained_first(weights)
    h, tgt, w = (_take(x, order) for x in (hidden, targets, weights))
    n = _chunks_with_training(w, chunk_len)

    def body(state):
        i, carry = state
        start = i * chunk_len
        chunk = (jax.lax.dynamic_slice_in_dim(x, start, chunk_len, axis=1) for x in (h, tgt, w))
        return i + 1, fn(carry, start, *chunk)

    _, carry = jax.lax.while_loop(lambda state: state[0] < n, body, (jnp.zeros((), jnp.int32), init))
    return carry, inverse


def _chunk_logits(h, kernel, dtype):
    b, c, d = h.shape
    return product("md,dv->mv", h.reshape(b * c, d).astype(dtype), kernel.astype(dtype))  # [b*c, V] float32


def _chunk_stats(logits, targets, weights):
    lse = jax.nn.logsumexp(logits, axis=-1)
    label = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    loss = jnp.sum(weights * (lse - label))
    correct = jnp.sum(weights * (jnp.argmax(logits, axis=-1) == targets))
    return loss, correct, lse


def _is_one_chunk(chunk_len, seq_len):
    """`chunk_len` 0 (or the whole sequence) is one chunk: nothing to reorder or skip."""
    return not chunk_len or chunk_len >= seq_len


def _flat(targets, weights):
    return targets.reshape(-1), weights.reshape(-1).astype(jnp.float32)


def _chunk_sums(h, kernel, targets, weights, dtype):
    """(loss sum, correct sum) of one chunk h [B, c, D], for evaluation."""
    loss, correct, _ = _chunk_stats(_chunk_logits(h, kernel, dtype), *_flat(targets, weights))
    return loss, correct


def _chunk_grads(h, kernel, targets, weights, dtype, tied):
    """Loss sum, d hidden [B, c, D] and d kernel of one chunk h [B, c, D]."""
    d = h.shape[-1]
    tgt, w = _flat(targets, weights)
    logits = _chunk_logits(h, kernel, dtype)
    loss, _, lse = _chunk_stats(logits, tgt, w)
    one_hot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == tgt[:, None]
    dlogits_f32 = (jnp.exp(logits - lse[:, None]) - one_hot) * w[:, None]
    dlogits = dlogits_f32.astype(dtype)
    # einsum, not dot(a, b.T): an explicit transpose makes XLA:CPU upcast this bf16 dot to f32.
    dh = product("mv,dv->md", dlogits, kernel.astype(dtype))
    if not matmul.cpu_layouts():
        dk = product("md,mv->dv", h.reshape(-1, d).astype(dtype), dlogits)
    elif tied:  # float32 inputs, not bf16 ones cast up: XLA strips such casts
        dk = product("dm,mv->dv", transpose_2d(h.reshape(-1, d).astype(jnp.float32)), dlogits_f32)
    else:
        dk = product("dm,mv->dv", transpose_2d(h.reshape(-1, d).astype(dtype)), dlogits)
    return loss, dh.reshape(h.shape), dk


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def fused_loss_sum(hidden, kernel, targets, weights, dtype, chunk_len, tied=False):
    """Sum over positions of `weights * CE(hidden @ kernel, targets)`.

    hidden [B, T, D] (float32), kernel [D, V] (the transposed embedding when `tied`),
    targets [B, T] int, weights [B, T] float.
    """
    return _fused_fwd(hidden, kernel, targets, weights, dtype, chunk_len, tied)[0]


def _fused_fwd(hidden, kernel, targets, weights, dtype, chunk_len, tied=False):
    if _is_one_chunk(chunk_len, hidden.shape[1]):
        loss, dhidden, dkernel = _chunk_grads(hidden, kernel, targets, weights, dtype, tied)
    else:
        def step(carry, start, h, tgt, w):
            loss, dh, dk = carry
            loss_c, dh_c, dk_c = _chunk_grads(h, kernel, tgt, w, dtype, tied)
            return loss + loss_c, jax.lax.dynamic_update_slice_in_dim(dh, dh_c, start, axis=1), dk + dk_c

        init = (jnp.zeros((), jnp.float32), jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
        (loss, dhidden, dkernel), inverse = _over_trained_chunks(step, init, hidden, targets, weights, chunk_len)
        dhidden = _take(dhidden, inverse)
    return loss, (dhidden, dkernel.astype(kernel.dtype), targets, weights)


def _fused_bwd(dtype, chunk_len, tied, residuals, g):
    dhidden, dkernel, targets, weights = residuals
    return (g * dhidden).astype(jnp.float32), (g * dkernel).astype(dkernel.dtype), None, None


fused_loss_sum.defvjp(_fused_fwd, _fused_bwd)


def loss_and_accuracy_sums(hidden, kernel, targets, weights, dtype, chunk_len=0):
    """(sum of weighted CE, sum of weighted correct argmax) without gradients, for evaluation."""
    if _is_one_chunk(chunk_len, hidden.shape[1]):
        return _chunk_sums(hidden, kernel, targets, weights, dtype)

    def step(carry, start, h, tgt, w):
        loss, correct = _chunk_sums(h, kernel, tgt, w, dtype)
        return carry[0] + loss, carry[1] + correct

    zero = jnp.zeros((), jnp.float32)
    (loss, correct), _ = _over_trained_chunks(step, (zero, zero), hidden, targets, weights, chunk_len)
    return loss, correct
