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


def test_throughput_counts_the_tokens_of_every_process(monkeypatch):
    """On several hosts each process holds only its slice of the rows: the per-step
    collective sums the processes' non-padding tokens (and ORs their stop flags)."""
    from jaxtune import distributed

    assert distributed.any_and_sum(False, 456) == (False, 456)  # one process: its own count
    gathered = np.asarray([[0, 228], [1, 230], [0, 0]])  # what process_allgather returns for 3 processes
    monkeypatch.setattr(distributed, "gather", lambda value: gathered)
    assert distributed.any_and_sum(False, 228) == (True, 458)


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


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_long_schedule_keeps_its_last_rates_exact(schedule):
    """float32 `1 - progress` lost the end of a long run: cosine's last rates were 0, linear's
    0.6% off; against HF's formulas in float64."""
    total, warmup = 200_000, 6_000
    sched = lr_schedule(OptimizerSettings(lr=1.0, schedule=schedule, warmup_steps=warmup), total)
    steps = np.array([warmup, warmup + 1, total // 2, total - 100, total - 15, total - 2, total - 1, total])
    progress = (steps - warmup) / (total - warmup)
    expected = 1 - progress if schedule == "linear" else 0.5 * (1 + np.cos(np.pi * progress))
    got = np.array([float(sched(k)) for k in steps])
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-14)


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
    return trainer.lowered(rows).compile().memory_analysis().temp_size_in_bytes


def test_accumulating_two_micro_batches_costs_no_more_memory_than_three(tmp_path):
    """The first micro-batch ran outside the loop; with one more the loop was inlined and the
    step held two forward and backward passes: more memory than accumulating over 3 (and, on
    the Llama 3 8B shapes, than the whole batch at once)."""
    make_hf_llama(tmp_path, num_key_value_heads=2, num_hidden_layers=4, intermediate_size=256)
    micro = 2
    temp = {accum: _temp_bytes(Trainer(tmp_path, accum=accum, remat="dots"), synthetic_rows(micro * accum, 128))
            for accum in (1, 2, 3)}
    assert temp[2] <= temp[3] * 1.02, temp
    assert temp[2] < 1.6 * temp[1], temp  # one accumulator on top of one micro-batch's work


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


@pytest.mark.parametrize("mesh, accum", [
    (sharding.MeshShape(1, 1, 1), 1), (sharding.MeshShape(1, 8, 1), 1), (sharding.MeshShape(1, 4, 2), 2),
])
def test_step_updates_the_donated_state_in_place(ckpt, mesh, accum):
    """No copy of a state array per step. Skipping a bad step used to select between the old
    and new trees, and XLA then copied Adam's moments every step (temp memory ~1.3x)."""
    import re

    trainer = Trainer(ckpt, mesh, accum=accum)
    hlo = trainer.lowered(synthetic_rows(16, 32, seed=3)).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    arrays = {m.group(1) for m in re.finditer(r"%(\S+) = \w+\[[^\]]+\]\S* parameter\(", entry)}
    assert len(arrays) >= len(jax.tree.leaves(trainer.state.params))  # the pattern finds the state
    copied = re.findall(r"copy\(%([^)\s]+)\)", entry)
    assert not [name for name in copied if name in arrays]


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
    assert np.max(np.abs(np.subtract(bf16, fp32))) > 0  # bf16 compute did happen


@pytest.mark.parametrize("mesh, chunk", [
    (sharding.MeshShape(1, 1, 1), 0), (sharding.MeshShape(1, 8, 1), 0), (sharding.MeshShape(2, 2, 2), 0),
    (sharding.MeshShape(1, 1, 1), 16),
])
def test_bf16_compute_with_tied_embeddings_trains_on_every_mesh(tmp_path_factory, mesh, chunk):
    """Tied embeddings (Llama 3.2): the output projection's gradient used to become a bf16
    dot that XLA:CPU cannot run ("Unsupported element type for DotThunk").

    Not chunked on 8 fake devices: there XLA:CPU's in-process collectives inside the chunk
    loop deadlock now and then (before this fix too; see DEVELOPERS.md)."""
    path = tmp_path_factory.mktemp("tied")
    make_hf_llama(path, num_key_value_heads=2, tie_word_embeddings=True, hidden_size=128,
                  intermediate_size=384, num_attention_heads=4, head_dim=32, vocab_size=384)
    rows = synthetic_rows(8, 64, vocab=384, seed=12)
    fp32, _ = _run(path, mesh, rows, steps=2, chunk=chunk)
    bf16, _ = _run(path, mesh, rows, steps=2, chunk=chunk, compute_dtype="bfloat16")
    np.testing.assert_allclose(bf16, fp32, atol=2e-2)
    assert np.max(np.abs(np.subtract(bf16, fp32))) > 0  # bf16 compute did happen


def test_non_finite_step_is_skipped_and_counted(ckpt):
    trainer = Trainer(ckpt)
    rows = synthetic_rows(4, 32, seed=13)
    trainer.step(rows)
    before = trainer.params()
    opt_before = jax.device_get(trainer.state.opt_state)
    bad = slice_rows(rows, slice(None))
    bad.loss_weights = rows.loss_weights.copy()
    bad.loss_weights[0, 0] = np.nan
    m = trainer.step(bad)
    assert not m["applied"] and not np.isfinite(m["loss"])
    for a, b in zip(jax.tree.leaves(trainer.params()), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(jax.device_get(trainer.state.opt_state)), jax.tree.leaves(opt_before)):
        np.testing.assert_array_equal(a, b)  # Adam's moments and count too
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


def _torch_adamw(params, grads_seq, decays, *, lr, weight_decay, b1, b2, eps):
    """torch.optim.AdamW on copies of `params` (flat name -> array); no decay where not decays[name]."""
    import torch

    tp = {k: torch.nn.Parameter(torch.tensor(np.asarray(v), dtype=torch.float64)) for k, v in params.items()}
    groups = [{"params": [tp[k] for k in tp if decays[k]], "weight_decay": weight_decay},
              {"params": [tp[k] for k in tp if not decays[k]], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps)
    for grads in grads_seq:
        for k, p in tp.items():
            p.grad = torch.tensor(np.asarray(grads[k]), dtype=torch.float64)
        opt.step()
    return {k: p.detach().numpy() for k, p in tp.items()}


def test_adamw_settings_mean_what_torch_adamw_means():
    """lr, weight_decay, b1, b2 and eps of OptimizerSettings give torch.optim.AdamW's updates
    (constant schedule, no warmup, no clipping); norm weights and biases are not decayed."""
    names = {"kernel": ("layers", "mlp", "gate_proj", "kernel"), "bias": ("layers", "mlp", "gate_proj", "bias"),
             "norm": ("layers", "input_layernorm", "weight"), "embed": ("embed_tokens",)}
    rng = np.random.RandomState(0)
    shapes = {"kernel": (4, 6), "bias": (6,), "norm": (4,), "embed": (5, 4)}
    flat = {k: rng.randn(*s).astype(np.float32) for k, s in shapes.items()}
    # Gradients of mixed sizes (some near eps), so b1, b2 and eps all shape the updates.
    grads_seq = [{k: (rng.randn(*s) * rng.choice([1e-3, 1e-2, 1.0], size=s)).astype(np.float32)
                  for k, s in shapes.items()} for _ in range(4)]

    def tree(d):
        out = {}
        for k, path in names.items():
            node = out
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = jnp.asarray(d[k])
        return out

    def leaf(t, k):
        for p in names[k]:
            t = t[p]
        return np.asarray(t)

    hp = dict(lr=0.05, weight_decay=0.3, b1=0.8, b2=0.95, eps=1e-3)
    s = OptimizerSettings(schedule="constant", warmup_steps=0, warmup_ratio=0.0, max_grad_norm=0.0, **hp)
    opt = build_optimizer(s, total_steps=4)
    params = tree(flat)
    state = opt.init(params)
    for grads in grads_seq:
        updates, state = opt.update(tree(grads), state, params)
        params = optax.apply_updates(params, updates)
    decays = {"kernel": True, "bias": False, "norm": False, "embed": True}
    expected = _torch_adamw(flat, grads_seq, decays, **hp)
    for k in names:
        np.testing.assert_allclose(leaf(params, k), expected[k], atol=1e-6, rtol=0, err_msg=k)
    # Each setting matters here: torch with any one of them at its default lands far outside the tolerance.
    defaults = {f: getattr(OptimizerSettings(), f) for f in hp}
    for field in hp:
        other = _torch_adamw(flat, grads_seq, decays, **{**hp, field: defaults[field]})
        gap = max(np.abs(other[k] - expected[k]).max() for k in names)
        assert gap > 1e-4, (field, gap)
