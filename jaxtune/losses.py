"""Next-token cross-entropy fused with the lm head, a chunk of positions at a time.

The lm head and the loss are where the memory and much of the time go: logits for a
whole batch are `[B*T, vocab]` in float32 (4 GiB for 8k tokens of Llama 3). The fused
loss computes, per chunk of positions, the logits, the loss and already their gradients
(softmax - one_hot), and keeps only `d hidden` and `d kernel`: no logits are stored for
the backward pass and nothing is recomputed. `chunk_len=0` is one chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxtune.models.matmul import transpose_2d


def _chunks(x, chunk_len):
    """[B, T, ...] -> [T/c, B, c, ...] (the batch axis keeps its sharding)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // chunk_len, chunk_len, *x.shape[2:]), 1, 0)


def _chunk_logits(h, kernel, dtype):
    b, c, d = h.shape
    logits = jnp.dot(h.reshape(b * c, d).astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
    return logits  # [b*c, V] float32


def _chunk_stats(logits, targets, weights):
    lse = jax.nn.logsumexp(logits, axis=-1)
    label = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    loss = jnp.sum(weights * (lse - label))
    correct = jnp.sum(weights * (jnp.argmax(logits, axis=-1) == targets))
    return loss, correct, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_loss_sum(hidden, kernel, targets, weights, dtype, chunk_len):
    """Sum over positions of `weights * CE(hidden @ kernel, targets)`.

    hidden [B, T, D] (float32), kernel [D, V], targets [B, T] int, weights [B, T] float.
    """
    return _fused_fwd(hidden, kernel, targets, weights, dtype, chunk_len)[0]


def _fused_fwd(hidden, kernel, targets, weights, dtype, chunk_len):
    b, t, d = hidden.shape
    c = chunk_len or t

    def step(dkernel, xs):
        h, tgt, w = xs
        tgt, w = tgt.reshape(-1), w.reshape(-1).astype(jnp.float32)
        logits = _chunk_logits(h, kernel, dtype)
        loss, _, lse = _chunk_stats(logits, tgt, w)
        one_hot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == tgt[:, None]
        dlogits = ((jnp.exp(logits - lse[:, None]) - one_hot) * w[:, None]).astype(dtype)
        # einsum, not dot(a, b.T): an explicit transpose makes XLA:CPU upcast this bf16 dot to f32.
        dh = jnp.einsum("mv,dv->md", dlogits, kernel.astype(dtype), preferred_element_type=jnp.float32)
        dk = jnp.dot(transpose_2d(h.reshape(-1, d).astype(dtype)), dlogits, preferred_element_type=jnp.float32)
        return dkernel + dk, (loss, dh.reshape(h.shape))

    dkernel0 = jnp.zeros(kernel.shape, jnp.float32)
    xs = (_chunks(hidden, c), _chunks(targets, c), _chunks(weights, c))
    dkernel, (losses, dh) = jax.lax.scan(step, dkernel0, xs)
    dhidden = jnp.moveaxis(dh, 0, 1).reshape(b, t, d)
    return jnp.sum(losses), (dhidden, dkernel.astype(kernel.dtype), targets, weights)


def _fused_bwd(dtype, chunk_len, residuals, g):
    dhidden, dkernel, targets, weights = residuals
    return (g * dhidden).astype(jnp.float32), (g * dkernel).astype(dkernel.dtype), None, None


fused_loss_sum.defvjp(_fused_fwd, _fused_bwd)


def loss_and_accuracy_sums(hidden, kernel, targets, weights, dtype, chunk_len=0):
    """(sum of weighted CE, sum of weighted correct argmax) without gradients, for evaluation."""
    c = chunk_len or hidden.shape[1]

    def step(_, xs):
        h, tgt, w = xs
        tgt, w = tgt.reshape(-1), w.reshape(-1).astype(jnp.float32)
        loss, correct, _ = _chunk_stats(_chunk_logits(h, kernel, dtype), tgt, w)
        return None, (loss, correct)

    xs = (_chunks(hidden, c), _chunks(targets, c), _chunks(weights, c))
    _, (losses, correct) = jax.lax.scan(step, None, xs)
    return jnp.sum(losses), jnp.sum(correct)
