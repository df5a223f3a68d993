"""The fused lm head + loss: plain cross-entropy numbers, and no lm head for chunks that train nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.losses import fused_loss_sum, loss_and_accuracy_sums

B, T, D, V = 4, 16, 8, 32


def _inputs(seed=0):
    rng = np.random.RandomState(seed)
    hidden = jnp.asarray(rng.randn(B, T, D), jnp.float32)
    kernel = jnp.asarray(rng.randn(D, V) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.randint(0, V, (B, T)), jnp.int32)
    weights = (rng.rand(B, T) < 0.3).astype(np.float32)
    weights[0] = 0.0  # a row that trains nothing
    weights[1] = 1.0  # a row that trains everything
    return hidden, kernel, targets, jnp.asarray(weights)


def _reference(hidden, kernel, targets, weights):
    logp = jax.nn.log_softmax(hidden @ kernel, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = jnp.argmax(logp, axis=-1) == targets
    return jnp.sum(weights * nll), jnp.sum(weights * correct)


@pytest.mark.parametrize("chunk_len", [0, 4, 8])
def test_fused_loss_equals_plain_cross_entropy(chunk_len):
    hidden, kernel, targets, weights = _inputs()
    fused = jax.value_and_grad(fused_loss_sum, argnums=(0, 1))
    loss, (dh, dk) = fused(hidden, kernel, targets, weights, jnp.float32, chunk_len)
    ref_loss, (ref_dh, ref_dk) = jax.value_and_grad(lambda h, k: _reference(h, k, targets, weights)[0], argnums=(0, 1))(
        hidden, kernel)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(dh, ref_dh, atol=1e-5)
    np.testing.assert_allclose(dk, ref_dk, atol=1e-5)
    ev_loss, ev_correct = loss_and_accuracy_sums(hidden, kernel, targets, weights, jnp.float32, chunk_len)
    ref_loss, ref_correct = _reference(hidden, kernel, targets, weights)
    np.testing.assert_allclose(ev_loss, ref_loss, rtol=1e-5)
    assert float(ev_correct) == float(ref_correct)


def test_chunks_that_train_nothing_are_never_computed():
    """Every row trains 4 scattered positions; the rest hold NaN hidden states. With chunks of
    4, the trained positions fill the first chunk of each row and the NaNs are never read."""
    hidden, kernel, targets, _ = _inputs(seed=1)
    rng = np.random.RandomState(2)
    weights = np.zeros((B, T), np.float32)
    for row in weights:
        row[rng.choice(T, 4, replace=False)] = 1.0
    hidden = jnp.where(jnp.asarray(weights)[..., None] == 0, jnp.nan, hidden)
    weights = jnp.asarray(weights)
    clean = jnp.where(jnp.isnan(hidden), 0.0, hidden)
    ref_loss, (ref_dh, ref_dk) = jax.value_and_grad(lambda h, k: _reference(h, k, targets, weights)[0], argnums=(0, 1))(
        clean, kernel)

    fused = jax.value_and_grad(fused_loss_sum, argnums=(0, 1))
    loss, (dh, dk) = fused(hidden, kernel, targets, weights, jnp.float32, 4)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(dh, ref_dh, atol=1e-5)  # zero at untrained positions
    np.testing.assert_allclose(dk, ref_dk, atol=1e-5)
    assert np.isfinite(float(loss_and_accuracy_sums(hidden, kernel, targets, weights, jnp.float32, 4)[0]))
    # One chunk (or chunks that mix in untrained positions) does read them:
    assert np.isnan(float(fused_loss_sum(hidden, kernel, targets, weights, jnp.float32, 0)))
    assert np.isnan(float(fused_loss_sum(hidden, kernel, targets, weights, jnp.float32, 8)))


def test_a_chunk_that_does_not_divide_the_sequence_is_refused():
    """T=16 in chunks of 6: the last chunk's slice would be moved back over positions already
    counted. (Training validates this; a direct caller of the library must get an error, not
    a loss that double-counts.)"""
    hidden, kernel, targets, weights = _inputs()
    with pytest.raises(ValueError, match="chunk_len 6 must divide the sequence length 16"):
        fused_loss_sum(hidden, kernel, targets, weights, jnp.float32, 6)
    with pytest.raises(ValueError, match="chunk_len 6 must divide"):
        loss_and_accuracy_sums(hidden, kernel, targets, weights, jnp.float32, 6)
