"""Config keys reach what they control, through `run(config)`.

Where a key's effect is observable in a tiny run (losses, stopping, files, output) the test
looks at that. Where it is internal (memory, speed, layout), the test records what `run`
builds (its step settings, model, state, batches) and checks the configured value arrived;
the step-level tests (test_train_step.py) show what those values then do. Most runs here
stop at their first train step, before it is compiled, so they cost only the setup.
"""

from __future__ import annotations

import inspect
import os
import re
import types

import jax.numpy as jnp
import pytest
from flax import nnx

import jaxtune.train
from jaxtune.data import DataSettings
from jaxtune.train import run
from run_helpers import make_config, train_losses

NO_EVAL = {"data__eval_files": (), "data__eval_fraction": 0.0}


class _Stop(Exception):
    """Raised by the recording train step to end a run before its first step."""


def _run_recorded(monkeypatch, overrides: dict, *, train: bool = False):
    """run(make_config(overrides)), recording what it builds.

    Returns a namespace: settings (the StepSettings), model (graphdef merged with the
    state's params), state and batch (the first train step's arguments), result (the
    RunResult; None when `train` is False and the run was stopped at its first step).
    """
    seen = types.SimpleNamespace(settings=None, graphdef=None, state=None, batch=None, model=None, result=None)
    real = getattr(jaxtune.train.make_train_step, "__wrapped__", jaxtune.train.make_train_step)
    signature = inspect.signature(real)

    def make_train_step(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        seen.graphdef, seen.settings = bound.arguments["graphdef"], bound.arguments["settings"]
        step = real(*args, **kwargs)

        def recording_step(state, batch):
            if seen.state is None:
                seen.state, seen.batch = state, batch
            if not train:
                raise _Stop
            return step(state, batch)

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


# ---- early_stopping.min_delta ---------------------------------------------------------------
@pytest.mark.parametrize("min_delta, reason, step", [(10.0, "early_stopping", 2), (0.0, "completed", 3)])
def test_early_stopping_min_delta(tiny, min_delta, reason, step):
    """An improving run: every evaluation beats the last, but never by 10 nats."""
    result = run(make_config(tiny(
        train__max_steps=3, train__eval_every=1, train__save_every=100, optimizer__warmup_steps=0,
        early_stopping__patience=1, early_stopping__min_delta=min_delta, logging__tensorboard=False,
        logging__plot=False)))
    evals = [r["eval_loss"] for r in result.history if r.get("eval_loss") is not None]
    assert (result.stop_reason, result.step, len(evals)) == (reason, step, step)
    assert evals == sorted(evals, reverse=True) and len(set(evals)) == len(evals)  # strictly improving


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


# ---- data.* ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("format", "alpaca"), ("packing", False), ("truncation", "drop"), ("train_on_prompt", True),
    ("on_bad_record", "skip"),
])
def test_data_keys_reach_data_settings(tiny, key, value):
    config = make_config(tiny(**{f"data__{key}": value}))
    assert getattr(DataSettings.from_config(make_config(tiny())), key) != value  # not the default
    assert getattr(DataSettings.from_config(config), key) == value


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
