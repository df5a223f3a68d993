"""The sharded train step: same numbers on every mesh, with accumulation, remat and chunking."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtune import sharding
from jaxtune.optim import OptimizerSettings, build_optimizer, decay_mask, lr_schedule
from helpers import make_hf_llama
from train_helpers import Trainer, slice_rows, synthetic_rows


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_llama(path, num_key_value_heads=2)
    return path


def _run(path, mesh_shape, rows, steps=5, **kw):
    trainer = Trainer(path, mesh_shape, **kw)
    losses = [float(trainer.step(rows)["loss"]) for _ in range(steps)]
    return losses, trainer


def test_same_losses_on_every_mesh(ckpt):
    rows = synthetic_rows(8, 32)
    meshes = [sharding.MeshShape(8, 1, 1), sharding.MeshShape(1, 8, 1), sharding.MeshShape(2, 2, 2),
              sharding.MeshShape(1, 4, 2)]
    reference, _ = _run(ckpt, sharding.MeshShape(1, 1, 1), rows)
    assert reference[-1] < reference[0]  # it trains
    for mesh in meshes:
        losses, trainer = _run(ckpt, mesh, rows)
        np.testing.assert_allclose(losses, reference, atol=1e-5, err_msg=str(mesh))
        q = trainer.state.params["layers"]["self_attn"]["q_proj"]["kernel"]
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        # FSDP shards the optimizer state like the parameters.
        mu = trainer.state.opt_state[1][0].mu["layers"]["self_attn"]["q_proj"]["kernel"]
        assert mu.sharding.spec == q.sharding.spec


def test_accumulation_equals_one_big_batch(ckpt):
    rows = synthetic_rows(8, 32, seed=3)
    rows.loss_weights[:2, 4:] = 0.0  # the first micro-batch trains far fewer tokens than the others
    counts = rows.loss_weights.reshape(4, 2, 32).sum(axis=(1, 2))
    assert counts.min() < counts.max() / 3
    # A fine-tuning learning rate (the default 2e-5): Adam divides by sqrt(v), which turns
    # float32 summation-order differences in near-zero gradient entries into update
    # differences proportional to lr.
    opt = OptimizerSettings(lr=2e-5, warmup_steps=0, weight_decay=0.1)
    t1 = Trainer(ckpt, sharding.MeshShape(1, 2, 1), opt=opt)
    t4 = Trainer(ckpt, sharding.MeshShape(1, 2, 1), opt=opt, accum=4)
    for _ in range(3):
        m1, m4 = t1.step(rows), t4.step(rows)
        np.testing.assert_allclose(m4["loss"], m1["loss"], atol=1e-6)
        np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(t1.params()), jax.tree.leaves(t4.params())):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_loss_is_normalised_by_trained_tokens_of_the_global_batch(ckpt):
    trainer = Trainer(ckpt)
    rows = synthetic_rows(4, 32, seed=5)
    model_logits = None
    from flax import nnx

    model = nnx.merge(trainer.graphdef, trainer.state.params)
    model_logits = np.asarray(model(jnp.asarray(rows.input_ids)))
    logp = jax.nn.log_softmax(model_logits, axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), rows.targets[..., None], axis=-1)[..., 0]
    expected = (nll * rows.loss_weights).sum() / rows.loss_weights.sum()
    np.testing.assert_allclose(trainer.step(rows)["loss"], expected, rtol=1e-5)


def test_step_counts_the_input_tokens_of_the_global_batch(ckpt):
    """Throughput counts non-padding tokens of the whole global batch, computed on the devices:
    on several hosts each process holds only its slice of the rows."""
    rows = synthetic_rows(8, 32, seed=7)
    rows.segment_ids[:, 20:] = 0  # padding
    rows.segment_ids[3, 5:] = 0
    metrics = Trainer(ckpt, sharding.MeshShape(2, 2, 1), accum=2).step(rows)
    assert int(metrics["input_tokens"]) == np.count_nonzero(rows.segment_ids) == 7 * 20 + 5


def test_schedule_matches_hand_computed_table():
    s = OptimizerSettings(lr=1.0, schedule="linear", warmup_steps=4, min_lr_ratio=0.0)
    lin = lr_schedule(s, total_steps=12)
    # HF get_linear_schedule_with_warmup: k/4 for k < 4, then (12 - k) / 8.
    table = {0: 0.0, 1: 0.25, 3: 0.75, 4: 1.0, 6: 0.75, 8: 0.5, 11: 0.125, 12: 0.0}
    for k, v in table.items():
        assert float(lin(k)) == pytest.approx(v, abs=1e-7), k
    cos = lr_schedule(OptimizerSettings(lr=2.0, schedule="cosine", warmup_ratio=0.1, min_lr_ratio=0.1), 20)
    # warmup = ceil(0.1 * 20) = 2; then 2 * (0.1 + 0.9 * 0.5 * (1 + cos(pi * (k - 2) / 18))).
    for k, v in {0: 0.0, 1: 1.0, 2: 2.0, 11: 2 * (0.1 + 0.9 * 0.5), 20: 0.2}.items():
        assert float(cos(k)) == pytest.approx(v, abs=1e-6), k
    const = lr_schedule(OptimizerSettings(lr=3.0, schedule="constant", warmup_steps=3), 10)
    assert [float(const(k)) for k in (0, 1, 3, 9)] == pytest.approx([0.0, 1.0, 3.0, 3.0])


def test_weight_decay_skips_norms_and_biases():
    params = {"layers": {"input_layernorm": {"weight": jnp.ones(3)}, "mlp": {"up_proj": {
        "kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}}, "embed_tokens": jnp.ones((4, 3))}
    assert decay_mask(params) == {"layers": {"input_layernorm": {"weight": False}, "mlp": {"up_proj": {
        "kernel": True, "bias": False}}}, "embed_tokens": True}
    opt = build_optimizer(OptimizerSettings(lr=0.1, weight_decay=0.5, max_grad_norm=0.0), total_steps=10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["layers"]["input_layernorm"]["weight"], 1.0)
    np.testing.assert_array_equal(new["layers"]["mlp"]["up_proj"]["bias"], 1.0)
    np.testing.assert_allclose(new["layers"]["mlp"]["up_proj"]["kernel"], 1.0 - 0.1 * 0.5)
    np.testing.assert_allclose(new["embed_tokens"], 1.0 - 0.1 * 0.5)


def test_clipping_caps_the_global_norm():
    params = {"a": jnp.zeros(4), "b": jnp.zeros(3)}
    grads = {"a": jnp.full(4, 3.0), "b": jnp.full(3, 4.0)}  # norm sqrt(36 + 48) > 1
    opt = build_optimizer(OptimizerSettings(lr=0.1, max_grad_norm=1.0, b1=0.9), total_steps=10)
    _, state = opt.update(grads, opt.init(params), params)
    mu = state[1][0].mu  # first moment = (1 - b1) * clipped gradient
    assert float(optax.tree.norm(mu)) == pytest.approx(0.1 * 1.0, rel=1e-5)
    small = {"a": jnp.full(4, 0.1), "b": jnp.zeros(3)}
    _, state = opt.update(small, opt.init(params), params)
    assert float(optax.tree.norm(state[1][0].mu)) == pytest.approx(0.1 * 0.2, rel=1e-5)


def _temp_bytes(trainer, rows):
    from jaxtune.steps import to_global_batch

    batch = to_global_batch(rows, trainer.mesh, trainer.accum)
    return trainer.train_step.lower(trainer.state, batch).compile().memory_analysis().temp_size_in_bytes


def test_remat_changes_no_number_and_lowers_temp_memory(tmp_path):
    make_hf_llama(tmp_path, num_key_value_heads=2, num_hidden_layers=4, intermediate_size=256)
    rows = synthetic_rows(4, 128, seed=7)
    results = {}
    for policy in ("none", "dots", "dots_no_batch", "full"):
        trainer = Trainer(tmp_path, remat=policy, opt=OptimizerSettings(lr=1e-4))
        temp = _temp_bytes(trainer, rows)
        losses = [float(trainer.step(rows)["loss"]) for _ in range(2)]
        results[policy] = (temp, losses, trainer.params())
    print("\ncompiled temp memory per remat policy (bytes):",
          {k: v[0] for k, v in results.items()})
    for policy, (temp, losses, params) in results.items():
        np.testing.assert_allclose(losses, results["none"][1], atol=1e-5)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(results["none"][2])):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert results["full"][0] < results["dots"][0] < results["none"][0]
    assert results["dots_no_batch"][0] < results["none"][0]


def test_loss_chunking_changes_memory_not_numbers(tmp_path):
    make_hf_llama(tmp_path, num_key_value_heads=2, vocab_size=4096)
    rows = synthetic_rows(4, 128, vocab=4096, seed=9)
    whole, chunked = Trainer(tmp_path, chunk=0), Trainer(tmp_path, chunk=16)
    assert _temp_bytes(chunked, rows) < _temp_bytes(whole, rows)
    np.testing.assert_allclose(chunked.step(rows)["loss"], whole.step(rows)["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(chunked.params()), jax.tree.leaves(whole.params())):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_trains_close_to_fp32(ckpt):
    rows = synthetic_rows(4, 32, seed=11)
    fp32, _ = _run(ckpt, sharding.MeshShape(1, 1, 1), rows, steps=3)
    bf16, t = _run(ckpt, sharding.MeshShape(1, 1, 1), rows, steps=3, compute_dtype="bfloat16")
    assert t.state.params["embed_tokens"].dtype == jnp.float32
    np.testing.assert_allclose(bf16, fp32, atol=2e-2)


def test_non_finite_step_is_skipped_and_counted(ckpt):
    trainer = Trainer(ckpt)
    rows = synthetic_rows(4, 32, seed=13)
    trainer.step(rows)
    before = trainer.params()
    bad = slice_rows(rows, slice(None))
    bad.loss_weights = rows.loss_weights.copy()
    bad.loss_weights[0, 0] = np.nan
    m = trainer.step(bad)
    assert not m["applied"] and not np.isfinite(m["loss"])
    for a, b in zip(jax.tree.leaves(trainer.params()), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    assert int(trainer.state.skipped) == 1 and int(trainer.state.consecutive_skipped) == 1
    assert int(trainer.state.applied) == 1 and int(trainer.state.step) == 2
    m = trainer.step(rows)
    assert m["applied"] and int(trainer.state.consecutive_skipped) == 0
    assert float(m["lr"]) == pytest.approx(float(trainer.schedule(1)))  # the skipped step did not advance lr


def test_loss_spike_is_skipped(ckpt):
    trainer = Trainer(ckpt, spike_factor=1.5, window=4, opt=OptimizerSettings(lr=1e-2, max_grad_norm=0.0))
    easy = synthetic_rows(4, 32, seed=1)
    losses = [float(trainer.step(easy)["loss"]) for _ in range(25)]  # memorise one batch
    assert losses[-1] < 3.0 < losses[0]
    before = trainer.params()
    m = trainer.step(synthetic_rows(4, 32, seed=2))  # unseen data: a loss far above the median
    assert not m["applied"] and np.isfinite(m["loss"])
    for a, b in zip(jax.tree.leaves(trainer.params()), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    assert trainer.step(easy)["applied"]


def test_chunked_loss_with_sparse_training_on_every_mesh(ckpt):
    """Mostly-untrained rows (as in SFT) skip lm-head chunks; the numbers do not change."""
    rows = synthetic_rows(8, 64, seed=21, weight_prob=0.15)
    whole, _ = _run(ckpt, sharding.MeshShape(1, 1, 1), rows, steps=3)
    for mesh in [sharding.MeshShape(8, 1, 1), sharding.MeshShape(2, 2, 2), sharding.MeshShape(1, 4, 2)]:
        chunked, _ = _run(ckpt, mesh, rows, steps=3, chunk=8)
        np.testing.assert_allclose(chunked, whole, rtol=1e-5)
