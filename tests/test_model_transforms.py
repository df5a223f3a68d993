"""Scan, remat, sharded placement: none of them changes a number."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtune
from jaxtune import sharding
from jaxtune.models.hf_io import abstract_model, iter_hf_tensors
from jaxtune.models.llama import REMAT_POLICIES, LlamaConfig
from helpers import TINY, assert_close_scaled, make_hf_llama


def _loss_and_grads(model, ids, weights):
    graphdef, state = nnx.split(model)
    params = nnx.as_pure(state)

    @jax.jit
    def f(params):
        def loss(params):
            return jnp.sum(nnx.merge(graphdef, params)(ids) * weights)

        return jax.value_and_grad(loss)(params)

    return f(params)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    ref = make_hf_llama(path, num_key_value_heads=2, num_hidden_layers=3)
    return path, ref


def test_gradients_match_torch_and_every_remat_policy(checkpoint):
    import torch

    path, ref = checkpoint
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 128, (2, 24))
    weights = rng.randn(2, 24, 128).astype(np.float32)

    ref.zero_grad()
    loss_t = (ref(torch.tensor(ids)).logits * torch.tensor(weights)).sum()
    loss_t.backward()
    torch_grads = {n: p.grad.numpy() for n, p in ref.named_parameters()}

    results = {}
    for policy in REMAT_POLICIES:
        model = jaxtune.from_pretrained(path, remat=policy)
        results[policy] = _loss_and_grads(model, jnp.asarray(ids), jnp.asarray(weights))

    config = LlamaConfig.from_pretrained(path)
    plain_loss, plain_grads = results["none"]
    np.testing.assert_allclose(plain_loss, loss_t.item(), rtol=1e-4)
    for name, g in iter_hf_tensors(plain_grads, config):
        assert_close_scaled(g, torch_grads[name], tol=1e-4)
    for policy, (loss, grads) in results.items():
        np.testing.assert_allclose(loss, plain_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
            assert_close_scaled(a, np.asarray(b), tol=1e-5)


def _compiled_grad_text(layers):
    config = LlamaConfig.from_hf_dict({**TINY, "num_hidden_layers": layers})
    graphdef, abstract = abstract_model(config, remat="dots")
    params = nnx.as_pure(abstract)
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def loss(params, ids):
        return nnx.merge(graphdef, params)(ids).sum()

    return jax.jit(jax.grad(loss)).lower(params, ids).compile().as_text()


def test_program_size_does_not_grow_with_depth():
    # Scanned layers compile one block: the program for 16 layers is the program for 2.
    # (tools/bench.py --compile prints the compile times.)
    small, deep = _compiled_grad_text(2), _compiled_grad_text(16)
    assert len(deep.splitlines()) < 1.1 * len(small.splitlines())


def test_load_straight_into_shardings(checkpoint):
    path, ref = checkpoint
    mesh = sharding.make_mesh(sharding.MeshShape(data=1, fsdp=4, tensor=2))
    model = jaxtune.from_pretrained(path, sharding_fn=sharding.param_sharding_fn(mesh))
    q = model.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert {s.data.shape for s in q.addressable_shards} == {(3, 16, 2, 16)}
    ids = np.random.RandomState(1).randint(0, 128, (2, 16))
    plain = jaxtune.from_pretrained(path)
    np.testing.assert_allclose(model(jnp.asarray(ids)), plain(jnp.asarray(ids)), atol=1e-5)


def test_unshardable_parameter_is_a_user_error(checkpoint):
    path, _ = checkpoint
    mesh = sharding.make_mesh(sharding.MeshShape(data=1, fsdp=1, tensor=8))  # 2 kv heads, 8-way split
    with pytest.raises(jaxtune.errors.UserError, match=r"dimension 2 \(size 2\) of parameter "
                       r"layers/self_attn/k_proj/kernel, shape .*, cannot be split 8 ways over mesh.tensor=8"):
        jaxtune.from_pretrained(path, sharding_fn=sharding.param_sharding_fn(mesh))


def test_tensor_parallelism_across_processes_is_refused():
    """Processes that share a batch shard would each feed other rows to it: JAX's raw
    "Invalid host data" at the first step, after data and weights had loaded."""
    mesh = sharding.make_mesh(sharding.MeshShape(data=1, fsdp=2, tensor=4))
    with pytest.raises(jaxtune.errors.UserError, match=r"mesh.data x mesh.fsdp = 2 must be a multiple of the 4 "
                       "processes: each process feeds its own rows, so mesh.tensor must not span processes"):
        sharding.check_rows_per_process(mesh, 4)
    sharding.check_rows_per_process(mesh, 2)  # 2 processes of 4 devices: tensor within each
    sharding.check_rows_per_process(mesh, 1)


def test_every_parameter_matches_exactly_one_rule():
    for overrides in ({}, {"attention_bias": True, "mlp_bias": True}, {"tie_word_embeddings": True}):
        config = LlamaConfig.from_hf_dict({**TINY, **overrides})
        _, abstract = abstract_model(config)
        for kp, _ in jax.tree_util.tree_flatten_with_path(nnx.as_pure(abstract))[0]:
            sharding.param_spec(tuple(str(k.key) for k in kp))
    with pytest.raises(RuntimeError, match="matches 0 partition rules"):
        sharding.param_spec(("layers", "new_thing", "kernel"))


def test_swiglu_backward_matches_autodiff_of_its_formula():
    from jaxtune.models.swiglu import swiglu

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    g, u, d = (jax.random.normal(k, (64, 96)) * 3 for k in (k1, k2, k3))
    plain = lambda g, u: jax.nn.silu(g) * u  # noqa: E731
    out, vjp = jax.vjp(lambda g, u: swiglu(g, u, jnp.float32), g, u)
    ref_out, ref_vjp = jax.vjp(plain, g, u)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(d), ref_vjp(d)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # bf16 inputs: computed in float32, one rounding at the end, gradients in the inputs' dtype.
    gb, ub = g.astype(jnp.bfloat16), u.astype(jnp.bfloat16)
    out_b, vjp_b = jax.vjp(lambda g, u: swiglu(g, u, jnp.bfloat16), gb, ub)
    assert out_b.dtype == jnp.bfloat16
    exact = plain(gb.astype(jnp.float32), ub.astype(jnp.float32))
    np.testing.assert_allclose(out_b.astype(jnp.float32), exact, rtol=8e-3, atol=1e-6)
    assert all(x.dtype == jnp.bfloat16 for x in vjp_b(d.astype(jnp.bfloat16)))


def _saved_bytes(policy, seq_len, mesh=None):
    """Bytes of what the backward pass of 2 layers keeps, traced on `mesh` if given."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals

    config = LlamaConfig.from_hf_dict({**TINY, "num_hidden_layers": 2})
    graphdef, abstract = abstract_model(config, remat=policy, compute_dtype="bfloat16")
    params = nnx.as_pure(abstract)
    ids = jnp.zeros((1, seq_len), jnp.int32)

    def loss(params):
        return nnx.merge(graphdef, params).hidden_states(ids).sum()

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    out = io.StringIO()
    on_mesh = sharding.activations_on(mesh) if mesh is not None else contextlib.nullcontext()
    with contextlib.redirect_stdout(out), on_mesh:
        print_saved_residuals(loss, zeros)  # lines like "f32[2,8,64,512] output of ..."
    sizes = {"f32": 4, "bf16": 2, "i32": 4, "bool": 1}
    return sum(sizes[dt] * int(np.prod([int(d) for d in dims.split(",") if d]))
               for dt, dims in re.findall(r"^(\w+)\[([\d,]*)\]", out.getvalue(), re.M))


def test_on_accelerators_remat_keeps_bf16_projection_outputs_in_bf16_unless_partial_sums(monkeypatch):
    """A bf16 projection returned its float32 sum and was cast after it, so remat `dots`
    (which saves products' results) kept every projection's output at twice the bytes
    needed. On GPUs and TPUs the product now rounds on output. (XLA:CPU would turn the
    saved bf16 buffers back into float32 itself, so on CPU the products stay float32.)"""
    from jaxtune.models import matmul

    layers, tokens = 2, 256  # as _saved_bytes makes them
    c = LlamaConfig.from_hf_dict(TINY)
    # What `dots` saves of a layer's projections: q, k, v, o, gate, up (the down projection's
    # output is only added to the residual stream, and the next layer's input is kept).
    widths = (c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim
              + c.hidden_size + 2 * c.intermediate_size)
    one_device = sharding.make_mesh(sharding.MeshShape(1, 1, 1), devices=jax.devices()[:1])
    on_cpu = _saved_bytes("dots", tokens, one_device)
    monkeypatch.setattr(matmul, "cpu_layouts", lambda: False)
    on_accelerators = _saved_bytes("dots", tokens, one_device)
    assert on_cpu - on_accelerators == layers * tokens * widths * 2  # each projection: 4 -> 2 bytes a value

    # With tensor parallelism o_proj's product on each device is a partial sum: rounded to
    # bf16 it would be reduced in bf16 (GPUs all-reduce bf16 as it is) and rounded twice.
    # It stays float32 there, and so does what remat keeps of it.
    tensor_parallel = sharding.make_mesh(sharding.MeshShape(1, 1, 2), devices=jax.devices()[:2])
    assert _saved_bytes("dots", tokens, tensor_parallel) - on_accelerators == layers * tokens * c.hidden_size * 2


def test_the_projections_that_keep_partial_sums_in_float32_are_those_the_rules_split_on_the_contraction():
    """`Projection(row_parallel=True)` restates what PARTITION_RULES decide: a rule that moved
    "tensor" onto (or off) a kernel's contracted axes without the flag would round partial
    sums to bf16 (or keep whole sums in float32) with no other test noticing."""
    from jaxtune.models.llama import Projection

    graphdef, abstract = abstract_model(LlamaConfig.from_hf_dict({**TINY, "attention_bias": True}))
    row_parallel, checked = set(), 0
    for path, module in nnx.iter_graph(nnx.merge(graphdef, abstract)):
        if isinstance(module, Projection):
            spec = sharding.param_spec((*path, "kernel"))
            stacked = int(path[0] == "layers")  # stacked layer parameters lead with [L]
            splits_contraction = "tensor" in tuple(spec)[stacked: stacked + module.n_in]
            assert module.row_parallel == splits_contraction, (path, spec)
            row_parallel |= {sharding.path_str(path)} if splits_contraction else set()
            checked += 1
    assert checked == 8  # q, k, v, o, gate, up, down and the (untied) lm head
    assert row_parallel == {"layers/self_attn/o_proj", "layers/mlp/down_proj"}


@pytest.mark.parametrize("policy", list(REMAT_POLICIES))
def test_no_remat_policy_keeps_memory_quadratic_in_the_sequence(policy):
    """What the backward pass keeps grows like T, not T^2: `dots` used to save every
    attention block's float32 scores (4 GiB per layer for one 8k-token row of Llama 3 8B)."""
    short, long = _saved_bytes(policy, 512), _saved_bytes(policy, 2048)
    assert long < 4.4 * short, (policy, short, long)


def test_attention_keeps_its_inputs_for_the_backward_pass_in_the_compute_dtype():
    """With bf16 compute the backward pass needs q, k, v only as the products use them, in bf16;
    keeping the float32 q and k (RoPE's outputs) doubled those residuals."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    from jaxtune.models.attention import causal_attention

    b, t, kv_heads, groups, h = 2, 128, 2, 3, 16
    q, k = jnp.ones((b, t, kv_heads, groups, h)), jnp.ones((b, t, kv_heads, h))
    v = jnp.ones((b, t, kv_heads, h), jnp.bfloat16)
    segments = jnp.ones((b, t), jnp.int32)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda q, k, v: causal_attention(q, k, v, segments, jnp.bfloat16), q, k, v)
    float32 = [line for line in out.getvalue().splitlines() if line.startswith("f32[") and not line.startswith("f32[]")]
    assert float32 and all("named 'attention_lse'" in line for line in float32), float32  # only the log-sum-exp
