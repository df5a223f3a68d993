"""Config keys reach what they control, through `run(config)`.

Where a key's effect is observable in a tiny run (losses, stopping, files, output) the test
looks at that. Where it is internal (memory, speed, layout), the test records what `run`
builds (its step settings, model, state, batches) and checks the configured value arrived;
the step-level tests (test_train_step.py) show what those values then do. Most runs here
stop at their first train step, before it is compiled, so they cost only the setup.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxtune.train
from jaxtune.data import DataSettings
from jaxtune.errors import UserError
from jaxtune.optim import OptimizerSettings
from jaxtune.train import run
from helpers import edit_config
from run_helpers import make_config, train_losses

NO_EVAL = {"data__eval_files": (), "data__eval_fraction": 0.0}


def _no_compile(*args):
    """`.lower(...)` of a stub step: the run's ahead-of-time compile has nothing to do."""
    return types.SimpleNamespace(compile=lambda: None)


class _Stop(Exception):
    """Raised by the recording train step to end a run before its first step."""


def _run_recorded(monkeypatch, overrides: dict, *, train: bool = False):
    """run(make_config(overrides)), recording what it builds.

    Returns a namespace: settings (the StepSettings), model (graphdef merged with the
    state's params), state and batch (the first train step's arguments), initial_params
    (that state's parameters on the host, read before the step donates them), result (the
    RunResult; None when `train` is False and the run was stopped at its first step).
    """
    seen = types.SimpleNamespace(settings=None, graphdef=None, state=None, batch=None, model=None, result=None,
                                 initial_params=None)
    real = getattr(jaxtune.train.make_train_step, "__wrapped__", jaxtune.train.make_train_step)
    signature = inspect.signature(real)

    def make_train_step(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        seen.graphdef, seen.settings = bound.arguments["graphdef"], bound.arguments["settings"]
        step = real(*args, **kwargs)

        def recording_step(state, batch):
            if seen.state is None:
                seen.state, seen.batch = state, batch
                seen.initial_params = jax.device_get(state.params)  # the step donates the state
            if not train:
                raise _Stop
            return step(state, batch)

        # the run compiles its steps ahead; a run stopped at its first step needs no program
        recording_step.lower = step.lower if train else _no_compile
        return recording_step

    make_train_step.__wrapped__ = real  # a second recorded run in one test wraps the original
    monkeypatch.setattr(jaxtune.train, "make_train_step", make_train_step)
    try:
        seen.result = run(make_config(overrides))
    except _Stop:
        pass
    assert seen.state is not None, "the run never called its train step"
    seen.model = nnx.merge(seen.graphdef, seen.state.params)
    return seen


# ---- model.* --------------------------------------------------------------------------------
def test_compute_dtype_reaches_the_model_and_the_step_and_changes_the_losses(tiny, monkeypatch):
    # The demo-shaped model has tied embeddings: with bfloat16 this used to crash on the
    # default fsdp mesh ("DotThunk ... BF16 x BF16 = F32", see losses.py).
    losses, seen = {}, {}
    for dtype in ("float32", "bfloat16"):
        overrides = tiny(workdir=None if dtype == "float32" else str(tiny()["workdir"]) + "_bf16",
                         model__compute_dtype=dtype, train__max_steps=2, logging__tensorboard=False,
                         logging__plot=False, **NO_EVAL)
        seen[dtype] = _run_recorded(monkeypatch, overrides, train=True)
        losses[dtype] = train_losses(seen[dtype].result.history)
        assert seen[dtype].settings.compute_dtype == jnp.dtype(dtype)
        assert seen[dtype].model.compute_dtype == jnp.dtype(dtype)
        assert seen[dtype].state.params["embed_tokens"].dtype == jnp.float32  # master weights stay float32
    assert sorted(losses["bfloat16"]) == sorted(losses["float32"]) == [1, 2]
    for step in (1, 2):
        gap = abs(losses["bfloat16"][step] - losses["float32"][step])
        assert 1e-5 < gap < 5e-2, (step, losses)


def test_allow_pickle_lets_a_run_load_pytorch_model_bin(tiny, tmp_path, monkeypatch):
    """A model directory with only pytorch_model.bin: refused by default (before the workdir
    is touched), loaded and trained with model.allow_pickle=True."""
    import shutil

    import torch

    from helpers import make_hf_llama
    from jaxtune.models.hf_io import iter_hf_tensors
    from jaxtune.models.llama import LlamaConfig

    demo = tiny()["model.hf_path"]
    model_dir = tmp_path / "pickled"
    torch_model = make_hf_llama(model_dir, vocab_size=384)  # the demo tokenizer's size
    torch.save(torch_model.state_dict(), model_dir / "pytorch_model.bin")
    os.remove(model_dir / "model.safetensors")
    for name in os.listdir(demo):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(os.path.join(demo, name), model_dir)
    overrides = dict(model__hf_path=str(model_dir), train__max_steps=1, logging__tensorboard=False,
                     logging__plot=False, **NO_EVAL)

    refused = tmp_path / "refused"
    with pytest.raises(UserError, match=r"holds only PyTorch pickle weights \(pytorch_model.bin\).*allow_pickle=True"):
        run(make_config(tiny(workdir=refused, **overrides)))
    assert not refused.exists()

    seen = _run_recorded(monkeypatch, tiny(model__allow_pickle=True, **overrides), train=True)
    assert seen.result.stop_reason == "completed" and seen.result.step == 1
    assert np.isfinite(train_losses(seen.result.history)[1])
    # The run trained the pickled weights, not some other ones.
    expected = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    loaded = dict(iter_hf_tensors(seen.initial_params, LlamaConfig.from_pretrained(str(model_dir))))
    assert loaded.keys() == expected.keys()
    for name, value in loaded.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


@pytest.mark.parametrize("policy", ["full", "dots_no_batch"])
def test_remat_reaches_the_model(tiny, monkeypatch, policy):
    seen = _run_recorded(monkeypatch, tiny(model__remat=policy))
    assert seen.model.remat == policy  # tiny's default is "none"


def test_loss_chunk_len_and_spike_factor_reach_the_step_settings(tiny, monkeypatch):
    seen = _run_recorded(monkeypatch, tiny(model__loss_chunk_len=16, anomaly__spike_factor=2.5))
    assert seen.settings.loss_chunk_len == 16
    assert seen.settings.spike_factor == 2.5


# ---- train.grad_accum_steps, mesh.tensor ----------------------------------------------------
def test_grad_accum_steps_gives_the_train_step_a_leading_accumulation_axis(tiny, monkeypatch):
    # 8 fake devices: each micro-batch must hold a multiple of 8 rows.
    seen = _run_recorded(monkeypatch, tiny(train__global_batch_size=16, train__grad_accum_steps=2))
    assert seen.batch.input_ids.shape == (2, 8, 64)
    assert seen.batch.loss_weights.shape == (2, 8, 64)


def test_mesh_tensor_splits_the_attention_heads(tiny, monkeypatch):
    seen = _run_recorded(monkeypatch, tiny(mesh__tensor=2))
    q = seen.state.params["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, d, heads, head_dim]
    assert dict(q.sharding.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert q.sharding.spec[2] == "tensor"
    shard = q.sharding.shard_shape(q.shape)
    assert shard[2] == q.shape[2] // 2 and shard[1] == q.shape[1] // 4


@pytest.mark.parametrize("data, fsdp, expected", [
    (2, -1, {"data": 2, "fsdp": 4, "tensor": 1}),  # fsdp fills the devices left
    (-1, 2, {"data": 4, "fsdp": 2, "tensor": 1}),  # data fills; an ignored mesh.fsdp would make two -1s
])
def test_mesh_data_and_fsdp_shape_the_mesh_and_only_fsdp_shards_the_parameters(tiny, monkeypatch, data, fsdp,
                                                                                expected):
    overrides = tiny(mesh__data=data, mesh__fsdp=fsdp)
    seen = _run_recorded(monkeypatch, overrides)
    with open(os.path.join(overrides["workdir"], "config.json")) as f:
        assert json.load(f)["mesh"] == expected
    sharded = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(seen.state.params):
        assert dict(leaf.sharding.mesh.shape) == expected, path
        axes = {a for entry in leaf.sharding.spec for a in ((entry,) if isinstance(entry, str) else (entry or ()))}
        assert "data" not in axes, path  # replicated over the data axis
        # As many distinct blocks as fsdp shards: split over fsdp, copied over data.
        indices = leaf.sharding.devices_indices_map(leaf.shape).values()
        blocks = {tuple((i.start, i.stop) for i in idx) for idx in indices}
        assert len(blocks) == (expected["fsdp"] if "fsdp" in axes else 1), path
        sharded += "fsdp" in axes
    assert sharded >= 5  # embeddings, attention and MLP kernels
    q = seen.state.params["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, d, heads, head_dim]
    assert q.sharding.shard_shape(q.shape)[1] == q.shape[1] // expected["fsdp"]


# ---- train.eval_batch_size ------------------------------------------------------------------
def _eval_batch_rows(monkeypatch, overrides: dict):
    """(rows of each batch the eval step got, the RunResult) of a one-step run whose train
    step is a stub (the weights stay as loaded; only the eval step is compiled)."""
    rows = []
    real_eval = jaxtune.train.make_eval_step

    def make_eval_step(*args, **kwargs):
        step = real_eval(*args, **kwargs)

        def recording(params, batch):
            rows.append(batch.input_ids.shape[0])
            return step(params, batch)

        recording.lower = step.lower
        return recording

    def make_train_step(*args, **kwargs):
        metrics = {"loss": np.float32(1.0), "grad_norm": np.float32(1.0), "lr": np.float32(0.0),
                   "tokens": np.float32(1.0), "applied": np.bool_(True), "consecutive_skipped": np.int32(0)}
        stub = lambda state, batch: (state, metrics)  # noqa: E731
        stub.lower = _no_compile
        return stub

    monkeypatch.setattr(jaxtune.train, "make_eval_step", make_eval_step)
    monkeypatch.setattr(jaxtune.train, "make_train_step", make_train_step)
    result = run(make_config({**overrides, "train.max_steps": 1, "train.eval_every": 0,
                              "logging.tensorboard": False, "logging.plot": False}))
    return rows, result


def test_eval_batch_size_sets_the_rows_of_every_eval_batch(tiny, tmp_path, monkeypatch):
    # tiny: 8 rows per micro-batch; the 64 eval records pack into 32 rows of 64 tokens.
    default, by_default = _eval_batch_rows(monkeypatch, tiny(workdir=tmp_path / "default"))
    assert default == [8] * 4
    sixteen, by_16 = _eval_batch_rows(monkeypatch, tiny(workdir=tmp_path / "16", train__eval_batch_size=16))
    assert sixteen == [16] * 2
    # Grouping the rows otherwise changes the batches, not the evaluation.
    evals = [[r for r in result.history if "eval_loss" in r] for result in (by_default, by_16)]
    assert evals[0][-1]["eval_tokens"] == evals[1][-1]["eval_tokens"] > 0
    assert evals[0][-1]["eval_loss"] == pytest.approx(evals[1][-1]["eval_loss"], rel=1e-6)
    with pytest.raises(UserError, match="train.eval_batch_size = 12 rows must be a multiple"):
        run(make_config(tiny(workdir=tmp_path / "bad", train__eval_batch_size=12)))


# ---- optimizer.* ----------------------------------------------------------------------------
def test_every_optimizer_key_reaches_the_optimizer_and_the_schedule(tiny, monkeypatch):
    keys = {"lr": 1e-3, "schedule": "cosine", "warmup_ratio": 0.2, "warmup_steps": 3, "min_lr_ratio": 0.1,
            "weight_decay": 0.05, "b1": 0.8, "b2": 0.95, "eps": 1e-6, "max_grad_norm": 0.5}
    expected = OptimizerSettings(**keys)
    for field, value in keys.items():
        assert getattr(OptimizerSettings(), field) != value, field  # every one differs from its default
        assert make_config(tiny()).optimizer[field] != value, field  # and from tiny's value
    overrides = tiny(**{f"optimizer__{k}": v for k, v in keys.items()})
    assert OptimizerSettings.from_config(make_config(overrides).optimizer) == expected
    received = []

    def spy(name):
        real = getattr(jaxtune.train, name)

        def recording(settings, total_steps):
            received.append((name, settings, total_steps))
            return real(settings, total_steps)

        monkeypatch.setattr(jaxtune.train, name, recording)

    spy("build_optimizer")
    spy("lr_schedule")
    _run_recorded(monkeypatch, overrides)
    assert received == [("build_optimizer", expected, 12), ("lr_schedule", expected, 12)]


# ---- early_stopping.min_delta ---------------------------------------------------------------
@pytest.mark.parametrize("min_delta, reason, step", [(10.0, "early_stopping", 2), (0.0, "completed", 3)])
def test_early_stopping_min_delta(tiny, min_delta, reason, step):
    """An improving run: every evaluation beats the last, but never by 10 nats. Stopping between
    two log lines still logs the steps since the last one (they were lost)."""
    result = run(make_config(tiny(
        train__max_steps=3, train__eval_every=1, train__save_every=100, train__log_every=5,
        optimizer__warmup_steps=0, early_stopping__patience=1, early_stopping__min_delta=min_delta,
        logging__tensorboard=False, logging__plot=False)))
    evals = [r["eval_loss"] for r in result.history if r.get("eval_loss") is not None]
    assert (result.stop_reason, result.step, len(evals)) == (reason, step, step)
    assert evals == sorted(evals, reverse=True) and len(set(evals)) == len(evals)  # strictly improving
    assert [r["step"] for r in result.history if r.get("loss") is not None] == [step]


# ---- logging.* ------------------------------------------------------------------------------
@pytest.mark.parametrize("tensorboard", [True, False])
def test_logging_tensorboard(tiny, monkeypatch, tensorboard):
    overrides = tiny(logging__tensorboard=tensorboard)
    _run_recorded(monkeypatch, overrides)
    assert os.path.isdir(os.path.join(overrides["workdir"], "tensorboard")) is tensorboard
    assert os.path.isfile(os.path.join(overrides["workdir"], "metrics.jsonl"))  # the logger did start


@pytest.mark.parametrize("progress_bar", [True, False])
def test_logging_progress_bar(tiny, monkeypatch, capsys, progress_bar):
    _run_recorded(monkeypatch, tiny(logging__progress_bar=progress_bar, train__max_steps=7))
    out = capsys.readouterr()
    assert bool(re.search(r"\b0/7\b", out.err)) is progress_bar  # tqdm's "0/7 [00:00<?, ?step/s]"
    assert "7 steps (25 per epoch)" in out.out + out.err  # the run got as far as its summary either way


@pytest.mark.parametrize("max_seq_len, factor, warned", [(1024, None, True), (512, None, False), (1024, 4.0, False)])
def test_a_sequence_longer_than_the_models_context_is_warned_about(tiny, monkeypatch, capsys, tmp_path, max_seq_len,
                                                                   factor, warned):
    """The demo model's max_position_embeddings is 512; nothing said so when rows were longer.
    Linear RoPE scaling stretches the context (512 x 4 here): no warning then."""
    overrides = tiny(data__max_seq_len=max_seq_len, data__packing=False)
    if factor:
        model = tmp_path / "scaled"
        shutil.copytree(overrides["model.hf_path"], model)
        edit_config(model, rope_scaling={"rope_type": "linear", "factor": factor})
        overrides["model.hf_path"] = str(model)
    _run_recorded(monkeypatch, overrides)
    out = capsys.readouterr()
    message = f"warning: data.max_seq_len={max_seq_len} is longer than the model's context (512: max_position_embeddings=512"
    assert (message in out.out + out.err) is warned


@pytest.mark.parametrize("warmup_steps, warmup_ratio, source", [
    (12, 0.0, "optimizer.warmup_steps=12"), (11, 0.0, None), (0, 0.95, "12 step(s) from optimizer.warmup_ratio=0.95"),
])
def test_a_warmup_as_long_as_the_run_is_warned_about(tiny, monkeypatch, capsys, warmup_steps, warmup_ratio, source):
    """Warmup steps are set before the data gives the run's length (12 steps here): a
    warmup that long never reached the learning rate, and nothing said so."""
    _run_recorded(monkeypatch, tiny(optimizer__warmup_steps=warmup_steps, optimizer__warmup_ratio=warmup_ratio))
    out = capsys.readouterr()
    said = out.out + out.err
    assert ("is not shorter than the run" in said) is (source is not None)
    if source:
        warmup = warmup_steps or 12
        assert (f"warning: the warmup ({source}) is not shorter than the run (12 steps): the learning rate only "
                f"rises and ends at {11 / warmup:.3g} x optimizer.lr") in said


def test_a_one_step_run_whose_warmup_leaves_it_a_learning_rate_of_0_is_warned_about(tiny, monkeypatch, capsys):
    """A one-step smoke run with the default warmup ratio trained with lr 0 and changed nothing,
    silently: the warning was kept for runs of more than one step."""
    _run_recorded(monkeypatch, tiny(train__max_steps=1, optimizer__warmup_steps=0, optimizer__warmup_ratio=0.05))
    out = capsys.readouterr()
    assert ("warning: the warmup (1 step(s) from optimizer.warmup_ratio=0.05) is not shorter than the run (1 steps): "
            "its one update has learning rate 0, so the run changes no weight.") in out.out + out.err


def test_evaluation_settings_in_a_run_without_evaluation_data_are_warned_about(tiny, monkeypatch, capsys):
    """With no eval data, train.eval_batch_size and the checkpoint.* keys about the best model
    were silently unused, and an eval batch that did not divide the mesh (8 devices here)
    still stopped the run."""
    _run_recorded(monkeypatch, tiny(train__eval_batch_size=3, checkpoint__metric="eval_accuracy",
                                    checkpoint__keep_best=2, **NO_EVAL))
    assert ("warning: there is no evaluation data (data.eval_files is empty and data.eval_fraction=0), so these "
            "settings change nothing: train.eval_every=4, train.eval_batch_size=3, checkpoint.metric=eval_accuracy, "
            "checkpoint.keep_best=2.") in "".join(capsys.readouterr())
    _run_recorded(monkeypatch, tiny(workdir=str(tiny()["workdir"]) + "_2", train__eval_every=100, **NO_EVAL))
    assert "there is no evaluation data" not in "".join(capsys.readouterr())  # defaults: nothing to say
    with pytest.raises(UserError, match=r"train.eval_batch_size = 3 rows must be a multiple of the data-parallel"):
        _run_recorded(monkeypatch, tiny(workdir=str(tiny()["workdir"]) + "_3", train__eval_batch_size=3))


@pytest.mark.parametrize("window, warned", [(12, True), (11, False)])
def test_a_spike_guard_whose_window_outlasts_the_run_is_warned_about(tiny, monkeypatch, capsys, window, warned):
    """The guard skips nothing until its window holds anomaly.window losses: in a run of 12
    steps a window of 12 never fills, and nothing said so."""
    _run_recorded(monkeypatch, tiny(anomaly__spike_factor=3.0, anomaly__window=window))
    said = "".join(capsys.readouterr())
    assert ("cannot skip a step" in said) is warned
    assert not warned or ("warning: anomaly.spike_factor=3 cannot skip a step of this run: the guard waits for "
                          f"anomaly.window={window} applied losses, and the run has 12 steps.") in said


# ---- data.* ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("format", "alpaca"), ("packing", False), ("truncation", "drop"), ("train_on_prompt", True),
    ("on_bad_record", "skip"),
])
def test_data_keys_reach_data_settings(tiny, key, value):
    config = make_config(tiny(**{f"data__{key}": value}))
    assert getattr(DataSettings.from_config(make_config(tiny())), key) != value  # not the default
    assert getattr(DataSettings.from_config(config), key) == value


@pytest.mark.parametrize("fraction, held_out", [(0.1, 40), (0.25, 100)])
def test_eval_fraction_holds_out_that_many_train_records(tiny, monkeypatch, capsys, fraction, held_out):
    """round(fraction x 400) of the 400 train records become the eval split; training gets the rest."""
    import jaxtune.data

    prepared = []
    real = jaxtune.data.prepare_datasets

    def recording(*args, **kwargs):
        prepared.append(real(*args, **kwargs))
        return prepared[-1]

    monkeypatch.setattr(jaxtune.data, "prepare_datasets", recording)
    _run_recorded(monkeypatch, tiny(data__eval_files=(), data__eval_fraction=fraction))
    (data,) = prepared
    assert (data.report.eval.records, data.report.train.records) == (held_out, 400 - held_out)
    assert len(data.eval) == data.report.eval.rows > 0
    out = capsys.readouterr().out
    assert f"eval (held out of train): {held_out} records" in out
    assert f"({data.report.train.rows // 8} per epoch)" in out  # the loader has only the rest


def test_packing_false_puts_one_sample_per_row(tiny, monkeypatch, capsys):
    summaries = {}
    for packing in (True, False):
        workdir = str(tiny()["workdir"]) + f"_packing_{packing}"
        _run_recorded(monkeypatch, tiny(workdir=workdir, data__packing=packing))
        summaries[packing] = capsys.readouterr().out
    # 400 records of ~30 tokens: two a row when packed into 64 tokens, one a row otherwise.
    assert "400 samples -> 200 rows of 64 (packed" in summaries[True]
    assert "(25 per epoch)" in summaries[True]
    assert "400 samples -> 400 rows of 64 (one sample per row" in summaries[False]
    assert "(50 per epoch)" in summaries[False]
