"""Matrix products whose backward pass XLA:CPU runs fast.

XLA:CPU runs a dot quickly (and in bf16 at all) only when the left operand is contracted
on its last dimension. Autodiff's weight gradient `x^T @ dy` contracts the token axis,
the first dimension of `x`, so XLA falls back to a float32 dot with converted inputs:
2x slower in bf16 (measured: 10.5 ms vs 4.9 ms for [2048,384]^T @ [2048,1024]). `dense`
computes the same gradient from a materialised transpose (in float32, where XLA's own
layout is as fast, it contracts directly). `transpose_2d` goes through a
reshape, so XLA sees a copy to make, not a transposed operand to fold into the dot.
On other backends the same code is just a matmul with a transposed copy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def transpose_2d(x: jax.Array) -> jax.Array:
    """x.T, physically transposed (see the module docstring).

    The barrier is meant to keep XLA from fusing the transpose into the (rematerialised)
    elementwise producer of `x`, a fusion that reads with a stride and is slow. XLA:CPU
    drops the barrier and in the model still makes such fusions (RMSNorm + transpose, see
    DEVELOPERS.md); the compiled step differs slightly without it, so it stays.
    """
    m, n = x.shape
    x = jax.lax.optimization_barrier(x)
    return jnp.swapaxes(x.reshape(m, n, 1), 0, 2).reshape(n, m)


def _mm(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """[M, K] @ [K, N] with inputs cast to `dtype`, float32 result and accumulation."""
    return _mm(x.astype(dtype), w.astype(dtype))


def _dense_fwd(x, w, dtype):
    xc, wc = x.astype(dtype), w.astype(dtype)
    return _mm(xc, wc), (xc, wc, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _dense_bwd(dtype, residuals, g):
    xc, wc, x_proto, w_proto = residuals
    gc = g.astype(dtype)
    dx = jnp.einsum("mn,kn->mk", gc, wc, preferred_element_type=jnp.float32)
    if jnp.dtype(dtype) == jnp.float32:  # float32 contracts the token axis natively
        dw = jnp.einsum("mk,mn->kn", xc, gc, preferred_element_type=jnp.float32)
    else:
        dw = _mm(transpose_2d(xc), gc)
    return dx.astype(x_proto.dtype), dw.astype(w_proto.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)
