"""Matrix products: float32 accumulation, full float32 precision for float32 inputs, and
operand layouts XLA:CPU runs fast.

Precision: with float32 inputs a product is computed in float32 on every backend
(`Precision.HIGHEST`). By default TPUs would use one bfloat16 pass and recent NVIDIA GPUs
TF32, so `model.compute_dtype=float32` would silently not be float32 there (torch also
keeps TF32 off for matmuls by default). Choose bfloat16 compute for speed.

Layouts (CPU only, `cpu_layouts()`): XLA:CPU runs a dot quickly (and in bf16 at all) only
when the left operand is contracted on its last dimension. Autodiff's weight gradient
`x^T @ dy` contracts the token axis, the first dimension of `x`, so XLA falls back to a
float32 dot with converted inputs: 2x slower in bf16 (measured: 10.5 ms vs 4.9 ms for
[2048,384]^T @ [2048,1024]). `dense` computes the same gradient from a materialised
transpose (in float32, where XLA's own layout is as fast, it contracts directly).
`transpose_2d` goes through a reshape, so XLA sees a copy to make, not a transposed
operand to fold into the dot. GPUs and TPUs take transposed operands as they are, so
there the products contract directly and nothing is copied.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxtune.sharding import activation_mesh


def cpu_layouts() -> bool:
    """Whether products are laid out for XLA:CPU (copies that other backends don't need):
    the devices of the mesh a step is traced for, else JAX's default backend."""
    mesh = activation_mesh()
    if mesh is not None:
        return mesh.devices.flat[0].platform == "cpu"
    return jax.default_backend() == "cpu"


def product(spec: str, a: jax.Array, b: jax.Array, result_dtype=jnp.float32) -> jax.Array:
    """`einsum(spec, a, b)` accumulated in float32; exact float32 when both inputs are.

    A bf16 `result_dtype` (accelerators only, see `rounded_result_dtype`) rounds the float32
    sum once on output: XLA accumulates bf16 products in float32 on GPUs and TPUs."""
    exact = a.dtype == jnp.float32 and b.dtype == jnp.float32
    return jnp.einsum(spec, a, b, preferred_element_type=result_dtype,
                      precision=jax.lax.Precision.HIGHEST if exact else None)


def rounded_result_dtype(dtype) -> jnp.dtype:
    """What `dense` should return when its result is used only rounded to `dtype`.

    On GPUs and TPUs `dtype` itself: the product rounds once on output, and what remat
    saves of a bf16 projection takes half the memory of its float32 result. On CPU float32,
    then a cast: XLA:CPU runs a bf16 product with a bf16 result 2x slower (8.3 vs 4.5 ms
    for [2048,384] @ [384,1024]), outside its fast kernels."""
    return jnp.dtype(jnp.float32) if cpu_layouts() else jnp.dtype(dtype)


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


def token_contraction(x: jax.Array, g: jax.Array) -> jax.Array:
    """x^T @ g for x [M, K], g [M, N] (a weight gradient): [K, N] in float32."""
    if cpu_layouts() and x.dtype != jnp.float32:  # float32 contracts the token axis natively
        return product("km,mn->kn", transpose_2d(x), g)
    return product("mk,mn->kn", x, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x: jax.Array, w: jax.Array, dtype, result_dtype=jnp.float32) -> jax.Array:
    """[M, K] @ [K, N] with inputs cast to `dtype`, float32 accumulation, a `result_dtype`
    result."""
    return product("mk,kn->mn", x.astype(dtype), w.astype(dtype), result_dtype)


def _dense_fwd(x, w, dtype, result_dtype):
    xc, wc = x.astype(dtype), w.astype(dtype)
    return product("mk,kn->mn", xc, wc, result_dtype), (xc, wc, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _dense_bwd(dtype, result_dtype, residuals, g):
    xc, wc, x_proto, w_proto = residuals
    gc = g.astype(dtype)
    dx = product("mn,kn->mk", gc, wc)
    dw = token_contraction(xc, gc)
    return dx.astype(x_proto.dtype), dw.astype(w_proto.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)
