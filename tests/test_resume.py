"""Checkpoints: exact resume, preemption, crash safety, best model, early stopping, anomalies."""

import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import jaxtune.train
from jaxtune.checkpoint import Checkpointer
from jaxtune.state import LoopState
from jaxtune.errors import UserError
from jaxtune.train import AnomalyStop, run
from helpers import edit_config
from run_helpers import (ROOT, assert_trees_equal, make_config, read_metrics, run_py, tensorboard_scalars, train_losses,
                         write_recipe)

TIMING_KEYS = ("tokens_per_sec", "mfu")


def _comparable(history):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


@pytest.fixture(scope="module")
def reference(run_assets, tmp_path_factory):
    """The uninterrupted run (12 steps, eval and save every 4) on the 8 fake devices."""
    from run_helpers import tiny_overrides

    def overrides(workdir, **kw):
        base = tiny_overrides(workdir, run_assets.model, run_assets.train, run_assets.eval, run_assets.cache)
        return {**base, **{k.replace("__", "."): v for k, v in kw.items()}}

    result = run(make_config(overrides(tmp_path_factory.mktemp("reference") / "run")))
    return overrides, result


def test_resume_after_a_clean_stop_is_exact(reference, tmp_path):
    overrides, ref = reference
    config = make_config(overrides(tmp_path / "run"))
    first = run(config, should_stop=lambda step: step == 6)
    assert first.stop_reason == "preempted" and first.step == 6
    assert Checkpointer(str(tmp_path / "run"), keep=2, keep_best=1, metric="eval_loss",
                        greater_is_better=False).steps() == [4, 6]
    second = run(config)
    assert second.stop_reason == "completed" and second.step == 12
    assert _comparable(second.history) == _comparable(ref.history)  # bitwise: every loss and eval
    assert_trees_equal(second.params, ref.params)
    # metrics.jsonl holds each step once: the resumed run rewrote it from the checkpoint.
    assert _comparable(read_metrics(tmp_path / "run")) == _comparable(ref.history)


def test_a_run_shortened_to_its_stop_ends_there_and_one_shortened_below_it_is_refused(reference, tmp_path):
    """Stopped at step 6 (a stop's checkpoint, off the save schedule), then resumed with
    train.max_steps=6: the final evaluation was not saved (checkpoint 6 existed), so every
    rerun evaluated again. Resumed with max_steps=4, it reported "completed" at step 6."""
    overrides, _ = reference
    run(make_config(overrides(tmp_path / "run")), should_stop=lambda step: step == 6)
    with pytest.raises(UserError, match=re.escape("checkpoints/6 is past the end of this run (4 steps, "
                                                  "train.max_steps=4); resume with at least as many steps")):
        run(make_config(overrides(tmp_path / "run", train__max_steps=4)))
    config = make_config(overrides(tmp_path / "run", train__max_steps=6))
    ended = run(config)
    assert ended.stop_reason == "completed" and ended.step == 6
    assert [r["step"] for r in ended.history if "eval_loss" in r] == [4, 6]
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "6" / "at_stop")  # now the run's last
    again = run(config)
    assert again.history == ended.history and read_metrics(tmp_path / "run") == ended.history


def test_resume_never_refuses_a_used_workdir_unless_overwrite(reference, tmp_path):
    overrides, ref = reference
    # The previous run: other batches (seed 1), so what it left cannot pass for a fresh start.
    old = run(make_config(overrides(tmp_path / "run", train__max_steps=3, train__eval_every=0, train__seed=1)))
    with pytest.raises(UserError, match="holds a previous run's outputs .*checkpoints.* and train.resume=never"):
        run(make_config(overrides(tmp_path / "run", train__max_steps=2, train__resume="never")))
    fresh = run(make_config(overrides(tmp_path / "run", train__max_steps=2, train__eval_every=0,
                                      train__resume="never", train__overwrite=True)))
    # Started afresh: the first two steps of the uninterrupted seed-0 run (both train the weights
    # as loaded: the first update has lr 0), none of the old run's steps, and a new checkpoint 2.
    expected = {s: loss for s, loss in train_losses(ref.history).items() if s <= 2}
    assert train_losses(fresh.history) == pytest.approx(expected, rel=1e-6)
    assert train_losses(read_metrics(tmp_path / "run")) == train_losses(fresh.history)
    old_losses = train_losses(old.history)
    assert all(abs(old_losses[s] - expected[s]) > 1e-4 for s in expected), (old_losses, expected)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]  # the old run's 3 is gone


def test_overwrite_deletes_only_the_runs_outputs_and_only_once_the_data_is_good(reference, run_assets, tmp_path):
    overrides, _ = reference
    workdir = tmp_path / "run"
    run(make_config(overrides(workdir, train__max_steps=2, train__eval_every=0)))
    mine = workdir / "my_train.jsonl"  # the user's own files may live in the workdir
    shutil.copy(run_assets.train, mine)
    (workdir / "NOTES.md").write_text("mine")
    bad = workdir / "bad.jsonl"
    bad.write_text("{not json\n")
    again = dict(train__max_steps=3, train__eval_every=0, train__resume="never", train__overwrite=True)
    with pytest.raises(UserError, match="malformed JSON"):
        run(make_config(overrides(workdir, data__train_files=(str(bad),), **again)))
    assert os.path.isdir(workdir / "checkpoints" / "2")  # a data error destroys nothing
    # Nor does a model whose weights do not fit its config.json (found only when they load).
    model = tmp_path / "model"
    shutil.copytree(run_assets.model, model)
    with open(model / "config.json") as f:
        layers = json.load(f)["num_hidden_layers"]
    edit_config(model, num_hidden_layers=layers - 1)
    with pytest.raises(UserError, match="tensors this Llama does not use"):
        run(make_config(overrides(workdir, model__hf_path=str(model), data__train_files=(str(mine),), **again)))
    assert os.path.isdir(workdir / "checkpoints" / "2")
    fresh = run(make_config(overrides(workdir, data__train_files=(str(mine),), **again)))
    assert fresh.stop_reason == "completed" and fresh.step == 3
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]  # the previous run's step 2 is gone
    assert (workdir / "NOTES.md").read_text() == "mine" and mine.exists() and bad.exists()


def _wait_for_step(workdir, step, proc, timeout=120):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(path):
            steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
            if steps and steps[-1] >= step:
                return
        time.sleep(0.05)
    raise TimeoutError(f"run did not reach step {step}")


def _start(recipe):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), "--config", recipe],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


SIGNAL_DURING_SETUP = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import jaxtune.data
import jaxtune.train
from jaxtune.config import load_recipe

def prepare(*args, **kwargs):  # the user presses Ctrl-C while the data is being prepared
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
    raise SystemExit("the signal was ignored")

jaxtune.data.prepare_datasets = prepare
jaxtune.train.run(load_recipe({recipe!r}))
"""


def test_ctrl_c_before_training_starts_exits_at_once(reference, tmp_path):
    overrides, _ = reference
    recipe = write_recipe(tmp_path / "recipe.py", overrides(tmp_path / "run"))
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", SIGNAL_DURING_SETUP.format(root=ROOT, recipe=recipe)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert "SIGINT received before training started: exiting" in proc.stderr
    assert time.time() - start < 25  # not after the 30 s sleep


SIGNAL_DURING_IMPORTS = """
import importlib.abc, os, runpy, signal, sys

class CtrlCWhileJaxIsImported(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCWhileJaxIsImported())
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_while_run_py_imports_exits_at_once(reference, tmp_path):
    """Before jaxtune's handlers, a Ctrl-C during the imports raised KeyboardInterrupt: a
    traceback, or, when it landed in JAX's garbage-collection callback, nothing at all and
    the whole run went on (3 of 7 tries at 0.3-0.4 s)."""
    overrides, _ = reference
    recipe = write_recipe(tmp_path / "recipe.py", overrides(tmp_path / "run"))
    _assert_ctrl_c_during_imports_exits_at_once([os.path.join(ROOT, "run.py"), "--config", recipe], "jax")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("tool, args, module", [
    ("make_demo.py", ["--out", "{tmp}/model"], "transformers"),
    ("check_data.py", ["--data", os.path.join(ROOT, "data", "demo", "eval.jsonl"), "--tokenizer", "{tmp}"], "transformers"),
    ("bench.py", ["--jax-only", "--precision", "fp32", "--layers", "1", "--steps", "1", "--rounds", "1"], "jax"),
])
def test_ctrl_c_while_a_tool_imports_exits_at_once(tool, args, module, tmp_path):
    """The tools' heavy imports come after start-up too: a Ctrl-C there gave a KeyboardInterrupt
    traceback (or, inside JAX's garbage-collection callback, nothing: the tool went on)."""
    argv = [os.path.join(ROOT, "tools", tool), *(a.format(tmp=tmp_path) for a in args)]
    _assert_ctrl_c_during_imports_exits_at_once(argv, module)
    assert not (tmp_path / "model").exists()  # make_demo: no half-built model where a run would use it


def _assert_ctrl_c_during_imports_exits_at_once(argv, module):
    script = SIGNAL_DURING_IMPORTS.format(argv=argv, module=module)
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")  # no huge-page restart: one process
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert proc.stderr.strip() == "SIGINT received: exiting"


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_continues(reference, tmp_path):
    overrides, ref = reference
    workdir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.py", overrides(workdir))
    proc = _start(recipe)
    _wait_for_step(workdir, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err and "checkpoint saved" in out
    stopped_at = max(r["step"] for r in read_metrics(workdir))
    assert 5 <= stopped_at < 12 and os.path.isdir(workdir / "checkpoints" / str(stopped_at))

    proc = _start(recipe)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resuming from step {stopped_at}" in out
    assert _comparable(read_metrics(workdir)) == _comparable(ref.history)


@pytest.mark.slow
def test_sigkill_during_saves_restarts_from_the_last_complete_checkpoint(reference, tmp_path):
    overrides, ref = reference
    workdir = tmp_path / "run"
    # A save at every step: a kill lands in the middle of one most of the time.
    recipe = write_recipe(tmp_path / "recipe.py", overrides(workdir, train__save_every=1))
    proc = _start(recipe)
    _wait_for_step(workdir, 6, proc)
    proc.kill()
    proc.communicate()
    leftovers = glob.glob(str(workdir / "checkpoints" / "*orbax-checkpoint-tmp*"))
    complete = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
    assert complete, "no complete checkpoint before the kill"

    proc = _start(recipe)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resuming from step {complete[-1]}" in out, (leftovers, out)
    assert not glob.glob(str(workdir / "checkpoints" / "*orbax-checkpoint-tmp*"))
    assert train_losses(read_metrics(workdir)) == train_losses(ref.history)


def test_incomplete_checkpoint_is_ignored_and_removed(reference, tmp_path):
    overrides, ref = reference
    config = make_config(overrides(tmp_path / "run"))
    run(config, should_stop=lambda step: step == 8)
    ckpts = tmp_path / "run" / "checkpoints"
    # What a kill in the middle of writing step 9 leaves: a temporary directory, half full.
    partial = ckpts / "9.orbax-checkpoint-tmp-1234"
    shutil.copytree(ckpts / "8", partial)
    for f in glob.glob(str(partial / "state" / "**" / "*"), recursive=True)[::2]:
        if os.path.isfile(f):
            os.remove(f)
    result = run(config)
    assert not partial.exists()
    assert _comparable(result.history) == _comparable(ref.history)


def _corrupt(step_dir):
    """Damaged array data (the metadata intact): each data file of the arrays is 100 bytes of noise."""
    files = glob.glob(str(step_dir / "state" / "ocdbt.process_*" / "d" / "*"))
    assert files
    for f in files:
        with open(f, "wb") as fh:
            fh.write(np.random.RandomState(0).bytes(100))


def test_corrupted_checkpoint_is_named_and_can_fall_back(reference, tmp_path):
    """One line naming TensorStore's reason, not Orbax's wrapper (a repr of the whole spec);
    and the reads the failed restore left in flight print nothing: as they finished they
    printed tracebacks ("Event loop is closed", a never-awaited read coroutine, ...) after
    the error line."""
    overrides, ref = reference
    run(make_config(overrides(tmp_path / "run")), should_stop=lambda step: step == 8)
    _corrupt(tmp_path / "run" / "checkpoints" / "8")
    failed = run_py("--config", write_recipe(tmp_path / "recipe.py", overrides(tmp_path / "run")))
    assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr[-3000:]
    assert re.search(r"^error: checkpoint \S+/checkpoints/8 is corrupted or unreadable \(\w+: [A-Z_]+: Error reading "
                     r'"[^"]+" in OCDBT database.*\); delete it or set checkpoint.on_corrupt=fallback', failed.stderr)
    result = run(make_config(overrides(tmp_path / "run", checkpoint__on_corrupt="fallback")))
    assert result.stop_reason == "completed"
    assert train_losses(result.history) == train_losses(ref.history)


def test_a_run_whose_checkpoints_are_all_unreadable_or_deleted_is_not_started_over(reference, tmp_path):
    """With every checkpoint unreadable, fallback set them all aside and the run started from
    step 0 without a word, deleting best/ and rewriting metrics.jsonl; the same when the
    checkpoints had been deleted (to free disk) and the command was run again."""
    overrides, _ = reference
    run(make_config(overrides(tmp_path / "run")), should_stop=lambda step: step == 8)
    best, metrics = sorted(os.listdir(tmp_path / "run" / "best")), read_metrics(tmp_path / "run")
    for step in (4, 8):
        _corrupt(tmp_path / "run" / "checkpoints" / str(step))
    fallback = make_config(overrides(tmp_path / "run", checkpoint__on_corrupt="fallback"))
    for _ in range(2):  # and again at the next start, when only the set-aside ones are there
        with pytest.raises(UserError, match=re.escape("no readable checkpoint is left in") + r" \S+/checkpoints \(set "
                           r"aside as unreadable: 4.corrupt, 8.corrupt\), and starting over would replace"):
            run(fallback)
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    with pytest.raises(UserError, match=r"has no checkpoint to resume from, but best/\d is from a step at or past the "
                                        r"first save \(train.save_every=4\)"):
        run(make_config(overrides(tmp_path / "run")))
    assert sorted(os.listdir(tmp_path / "run" / "best")) == best and read_metrics(tmp_path / "run") == metrics


def test_a_run_that_died_before_its_first_checkpoint_starts_over_and_says_so(reference, tmp_path, capsys):
    overrides, _ = reference
    config = make_config(overrides(tmp_path / "run", train__max_steps=4, train__save_every=100))
    first = run(config)
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if killed before its first save
    again = run(config)
    assert again.step == 4 and _comparable(again.history) == _comparable(first.history)
    assert re.search(r"no checkpoint to resume from in \S+: starting from step 0, replacing what a run that stopped "
                     r"before its first checkpoint left \(best, metrics.jsonl, tensorboard, curves.png\)",
                     capsys.readouterr().out)
    # Killed while writing its first checkpoint, after the (smaller) best model of that step was
    # saved: best/4 is at the first save, yet the run had no checkpoint; it was refused forever.
    config = make_config(overrides(tmp_path / "killed", train__max_steps=4, train__save_every=4))
    first = run(config)
    os.rename(tmp_path / "killed" / "checkpoints" / "4", tmp_path / "killed" / "checkpoints" / "4.orbax-checkpoint-tmp-1")
    again = run(config)
    assert again.step == 4 and _comparable(again.history) == _comparable(first.history)


def _saved_checkpoints(tmp_path, steps=(1, 2)):
    ckpt = Checkpointer(str(tmp_path / "w"), keep=3, keep_best=1, metric="eval_loss", greater_is_better=False)
    for step in steps:
        ckpt.save(step, {"x": np.full((4, 64), float(step), np.float32)}, LoopState())
    ckpt.manager.wait_until_finished()
    abstract = {"x": jax.ShapeDtypeStruct((4, 64), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    return ckpt, abstract


def test_an_emptied_checkpoint_file_is_named_by_its_real_error(tmp_path):
    """An empty file (a crash or a full disk) made the message name json's hidden StopIteration
    ("StopIteration: 0"), the context json raises its decode error `from None` over."""
    ckpt, abstract = _saved_checkpoints(tmp_path)
    (tmp_path / "w" / "checkpoints" / "2" / "loop" / "metadata").write_text("")
    with pytest.raises(UserError, match=r"checkpoints/2 is corrupted or unreadable \(JSONDecodeError: Expecting value"):
        ckpt.restore_latest(abstract)


def test_after_a_good_restore_no_error_is_taken_for_an_echo_of_a_failed_one(tmp_path, monkeypatch):
    """The filter for a failed restore's stray reads was installed for good at the first
    restore: a later error naming a checkpoint file, or any 'Event loop is closed', vanished."""
    from jaxtune import checkpoint

    monkeypatch.setattr(checkpoint, "_restored_dirs", {})  # no failed restore of another test within the minute
    ckpt, abstract = _saved_checkpoints(tmp_path)
    step, state, _ = ckpt.restore_latest(abstract)
    assert step == 2 and float(state["x"][0, 0]) == 2.0
    later = OSError(28, "No space left on device", str(tmp_path / "w" / "checkpoints" / "2" / "x"))
    assert not checkpoint._is_abandoned_read(later)
    assert not checkpoint._is_abandoned_read(RuntimeError("Event loop is closed"))
    # while a failed restore's reads may still be finishing, its echoes are recognised, not others
    failed = str(tmp_path / "w" / "checkpoints" / "2") + os.sep
    checkpoint._restored_dirs[failed] = time.monotonic()
    assert checkpoint._is_abandoned_read(ValueError(f'Error reading "x/0.0" in OCDBT database at local file "{failed}state/"'))
    assert not checkpoint._is_abandoned_read(OSError(28, "No space left on device", "/elsewhere/x"))
    checkpoint._restored_dirs[failed] = time.monotonic() - 61
    assert not checkpoint._is_abandoned_read(RuntimeError("Event loop is closed"))


def _unstable(overrides, workdir, max_steps=16, **kw):
    """A learning rate high enough that eval loss improves, then gets worse for a while."""
    return overrides(workdir, optimizer__lr=0.05, optimizer__warmup_steps=0, optimizer__max_grad_norm=0.0,
                     optimizer__schedule="constant", train__eval_every=2, train__max_steps=max_steps, **kw)


def test_best_model_does_not_depend_on_save_frequency(reference, tmp_path):
    overrides, _ = reference
    result = run(make_config(_unstable(overrides, tmp_path / "run", max_steps=8, train__save_every=10,
                                       train__load_best_at_end=True)))
    evals = {r["step"]: r["eval_loss"] for r in result.history if "eval_loss" in r}
    best_step = min(evals, key=evals.get)
    assert best_step % 10 != 0 and best_step != max(evals), evals  # not at a save, not the last
    ckpt = Checkpointer(str(tmp_path / "run"), keep=2, keep_best=1, metric="eval_loss", greater_is_better=False)
    assert ckpt.best_step() == best_step
    best_params, meta = ckpt.restore_best(jax.eval_shape(lambda: result.params))
    assert meta["step"] == best_step and meta["value"] == evals[best_step]
    assert_trees_equal(result.params, best_params)  # load_best_at_end
    assert result.loop.best.step == best_step


def test_keep_and_keep_best_bound_what_is_kept(reference, tmp_path):
    overrides, ref = reference
    ckpt = Checkpointer(ref.workdir, keep=2, keep_best=1, metric="eval_loss", greater_is_better=False)
    assert ckpt.steps() == [8, 12]  # checkpoint.keep=2 of the saves at 4, 8, 12
    assert ckpt.best_manager.all_steps() == [12]
    run(make_config(overrides(tmp_path / "run", checkpoint__keep=3, checkpoint__keep_best=2,
                              train__save_every=2)))
    ckpt = Checkpointer(str(tmp_path / "run"), keep=3, keep_best=2, metric="eval_loss", greater_is_better=False)
    assert ckpt.steps() == [8, 10, 12] and sorted(ckpt.best_manager.all_steps()) == [8, 12]


def test_metric_direction_and_min_delta():
    from jaxtune.config import defaults, metric_greater_is_better
    from jaxtune.state import EarlyStoppingState

    c = defaults()
    assert metric_greater_is_better(c) is False  # eval_loss
    c.checkpoint.metric = "eval_accuracy"
    assert metric_greater_is_better(c) is True
    c.checkpoint.metric = "eval_ppl"
    assert metric_greater_is_better(c) is False
    c.checkpoint.greater_is_better = True
    assert metric_greater_is_better(c) is True
    es = EarlyStoppingState()
    for value in (1.0, 0.95, 0.949, 0.90):  # improvements of 0.05, 0.001, 0.049 against min_delta 0.01
        es.update(value, greater_is_better=False, min_delta=0.01)
    assert (es.best, es.bad_evals) == (0.90, 0)
    es.update(0.895, greater_is_better=False, min_delta=0.01)  # better, but by less than min_delta
    assert (es.best, es.bad_evals, es.should_stop(2)) == (0.895, 1, False)
    es.update(0.91, greater_is_better=False, min_delta=0.01)
    assert es.should_stop(2)


@pytest.mark.parametrize("greater_is_better", [False, True])
@pytest.mark.parametrize("values, min_delta", [
    ((1.0, 0.95, 0.90, 0.85, 0.80), 0.1),  # steady small gains: transformers stops at the 4th
    ((1.0, 0.95, 0.949, 0.90, 0.895, 0.91, 0.7, 0.71), 0.01),
    ((2.0, 2.0, 1.5, 1.6, 1.4, 1.4), 0.0),
])
def test_early_stopping_counts_as_transformers_callback(values, min_delta, greater_is_better):
    """The patience counter after each evaluation equals the one of transformers'
    EarlyStoppingCallback, whose best value is the Trainer's (moved by any improvement)."""
    from types import SimpleNamespace

    from transformers import EarlyStoppingCallback, TrainerState

    from jaxtune.state import EarlyStoppingState

    sign = -1.0 if greater_is_better else 1.0
    callback = EarlyStoppingCallback(early_stopping_patience=3, early_stopping_threshold=min_delta)
    args = SimpleNamespace(greater_is_better=greater_is_better)  # all the check reads of TrainingArguments
    hf_state, ours = TrainerState(), EarlyStoppingState()
    for value in values:
        value = sign * value
        callback.check_metric_value(args, hf_state, None, value)
        if hf_state.best_metric is None or (value > hf_state.best_metric if greater_is_better
                                            else value < hf_state.best_metric):
            hf_state.best_metric = value  # what the Trainer does after the callback
        ours.update(value, greater_is_better, min_delta)
        assert ours.bad_evals == callback.early_stopping_patience_counter, (values, value)
        assert ours.best == hf_state.best_metric


def test_best_model_follows_a_greater_is_better_metric(reference, tmp_path):
    overrides, _ = reference
    result = run(make_config(_unstable(overrides, tmp_path / "run", max_steps=8, checkpoint__metric="eval_accuracy")))
    evals = {r["step"]: r["eval_accuracy"] for r in result.history if "eval_loss" in r}
    best = max(evals.values())
    first_best = min(s for s, v in evals.items() if v == best)  # ties do not replace the best
    assert result.loop.best.step == first_best and result.loop.best.value == best


def _expected_stop(evals, patience, min_delta=0.0):
    best, bad = None, 0
    for step, value in evals:
        bad = 0 if best is None or best - value > min_delta else bad + 1
        best = value if best is None else min(best, value)
        if bad >= patience:
            return step
    return None


def test_early_stopping_after_exactly_patience_evaluations(reference, tmp_path):
    overrides, _ = reference
    full = run(make_config(_unstable(overrides, tmp_path / "full")))
    evals = [(r["step"], r["eval_loss"]) for r in full.history if "eval_loss" in r]
    expected = _expected_stop(evals, patience=2)
    assert expected is not None and expected < 16, evals

    stopped = run(make_config(_unstable(overrides, tmp_path / "es", early_stopping__patience=2)))
    assert stopped.stop_reason == "early_stopping" and stopped.step == expected
    assert stopped.loop.early_stopping.bad_evals == 2

    # Interrupted between two non-improving evaluations, the count survives the restart.
    config = make_config(_unstable(overrides, tmp_path / "restarted", early_stopping__patience=2))
    first = run(config, should_stop=lambda step: step == expected - 1)
    assert first.stop_reason == "preempted"
    second = run(config)
    assert second.stop_reason == "early_stopping" and second.step == expected
    assert _comparable(second.history) == _comparable(stopped.history)


def test_a_patience_that_cannot_stop_the_run_is_pointed_out(reference, tmp_path, capsys):
    overrides, _ = reference
    run(make_config(overrides(tmp_path / "run", train__max_steps=6, early_stopping__patience=2)))
    assert ("warning: early_stopping.patience=2 cannot stop this run: it evaluates 2 time(s) (every 4 of 6 "
            "steps) and stopping needs 3.") in capsys.readouterr().out
    run(make_config(overrides(tmp_path / "run2", train__max_steps=8, train__eval_every=2, early_stopping__patience=2)))
    assert "cannot stop this run" not in capsys.readouterr().out


def _poison(monkeypatch, bad_calls):
    """Makes the batches of the given train-step calls produce a NaN loss."""
    original = jaxtune.train.to_global_batch
    calls = {"n": 0}

    def poisoned(rows, mesh, accum):
        if accum is not None:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                rows = rows[np.arange(len(rows))]
                rows.loss_weights = rows.loss_weights.copy()
                rows.loss_weights[0, 0] = np.nan
        return original(rows, mesh, accum)

    monkeypatch.setattr(jaxtune.train, "to_global_batch", poisoned)


def test_nan_batch_is_skipped_counted_and_logged(reference, tmp_path, monkeypatch, capsys):
    overrides, ref = reference
    _poison(monkeypatch, {6})
    result = run(make_config(overrides(tmp_path / "run")))
    lines = {r["step"]: r for r in result.history if "loss" in r}
    assert lines[6]["skipped"] == 1 and lines[6]["loss"] is None
    assert all(lines[s]["skipped"] == 0 for s in lines if s != 6)
    assert "step 6 skipped: non-finite loss or gradients" in capsys.readouterr().out
    # Before the bad batch everything is as in the reference run.
    assert {s: lines[s]["loss"] for s in range(1, 6)} == {s: l for s, l in train_losses(ref.history).items() if s < 6}


def test_persistent_anomalies_roll_back_past_the_bad_batches(reference, tmp_path, monkeypatch, capsys):
    overrides, _ = reference
    _poison(monkeypatch, {6, 7, 8})
    result = run(make_config(overrides(tmp_path / "run", anomaly__max_consecutive=3, logging__progress_bar=True)))
    # The progress bar goes back with the run (it counted on from the abandoned steps, to 16 of 12).
    counts = [int(n) for n in re.findall(r"(\d+)/12 \[", capsys.readouterr().err)]
    assert counts[-1] == 12 and max(counts) == 12 and 4 in counts[counts.index(8):], counts
    events = [r for r in result.history if r.get("event") == "rollback"]
    assert events == [{"step": 8, "event": "rollback", "to_step": 4, "skipped_in_a_row": 3}]
    assert result.stop_reason == "completed" and result.step == 12 and result.loop.rollbacks == 1
    # The data moved on: 8 batches before the rollback to step 4, then 8 new ones for steps 5-12.
    assert (result.loop.epoch, result.loop.batch_index) == (0, 16)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.params))


def test_a_rollback_keeps_a_best_model_that_replaced_the_restored_one(reference, tmp_path, monkeypatch):
    """keep_best=1 deletes best/4 once step 6 evaluates better; a rollback to checkpoint 4
    then must not delete best/6 as well, which left no best model at all."""
    overrides, _ = reference
    scripted = iter([5.0, 4.0, 3.0] + [4.5] * 4)  # evals at 2, 4, 6 | rollback to 4 | 6, 8, 10, 12
    original = jaxtune.train.evaluate

    def evaluate(*args):
        return dataclasses.replace(original(*args), loss=next(scripted))

    monkeypatch.setattr(jaxtune.train, "evaluate", evaluate)
    _poison(monkeypatch, {6, 7, 8})
    result = run(make_config(overrides(tmp_path / "run", train__eval_every=2, anomaly__max_consecutive=3,
                                       train__load_best_at_end=True)))
    assert [(r["step"], r["to_step"]) for r in result.history if r.get("event") == "rollback"] == [(8, 4)]
    assert (result.loop.best.step, result.loop.best.value) == (6, 3.0)
    assert sorted(os.listdir(tmp_path / "run" / "best")) == ["6"]
    ckpt = Checkpointer(str(tmp_path / "run"), keep=2, keep_best=1, metric="eval_loss", greater_is_better=False)
    params, meta = ckpt.restore_best(jax.tree.map(np.asarray, result.params))
    assert meta["step"] == 6
    assert_trees_equal(params, result.params)  # load_best_at_end returned step 6's parameters


def test_a_rollback_skips_checkpoints_saved_during_the_bad_steps(reference, tmp_path, monkeypatch):
    """Checkpoint 6 is saved between the bad steps 5-7: it holds the failing state and a skip
    counter of 2, so restoring it undid nothing and the next rollback came after 2 bad steps."""
    overrides, _ = reference
    _poison(monkeypatch, {5, 6, 7})
    result = run(make_config(overrides(tmp_path / "run", train__save_every=2, anomaly__max_consecutive=3)))
    events = [(r["step"], r["to_step"]) for r in result.history if r.get("event") == "rollback"]
    assert events == [(7, 4)]
    assert result.stop_reason == "completed" and result.step == 12 and result.loop.rolled_back_to == 4
    lines = {r["step"]: r for r in result.history if "loss" in r}
    assert all(lines[s]["skipped"] == 0 for s in range(8, 13))  # the new timeline's steps 5-12, all applied
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["10", "12"]


def test_with_keep_1_a_save_during_the_bad_steps_leaves_the_checkpoint_a_rollback_needs(reference, tmp_path,
                                                                                       monkeypatch):
    """Checkpoint 8, saved between the bad steps 7-9, pushed out checkpoint 4, the only one from
    before them: the run stopped with exit code 3, saying there was none to roll back to "yet"."""
    overrides, _ = reference
    _poison(monkeypatch, {7, 8, 9})
    result = run(make_config(overrides(tmp_path / "run", checkpoint__keep=1, anomaly__max_consecutive=3)))
    assert [(r["step"], r["to_step"]) for r in result.history if r.get("event") == "rollback"] == [(9, 4)]
    assert result.stop_reason == "completed" and result.step == 12
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["12"]


def test_a_checkpoint_saved_during_skipped_steps_that_recovered_is_a_later_rollbacks_target(reference, tmp_path,
                                                                                            monkeypatch):
    """Steps 3-4 are skipped (checkpoint 4 is saved between them) and step 5 trains again; bad
    steps 6-8 then roll back to checkpoint 4, which holds step 2's weights. Counted as a save
    of the failing state, it was passed over and the run stopped with exit code 3."""
    overrides, _ = reference
    _poison(monkeypatch, {3, 4, 6, 7, 8})
    result = run(make_config(overrides(tmp_path / "run", anomaly__max_consecutive=3)))
    assert [(r["step"], r["to_step"]) for r in result.history if r.get("event") == "rollback"] == [(8, 4)]
    assert result.stop_reason == "completed" and result.step == 12


def test_a_second_rollback_to_the_same_checkpoint_stops_the_run(reference, tmp_path, monkeypatch):
    """Every batch from the 5th on is bad: rolling back to step 4 again and again never ended."""
    overrides, _ = reference
    _poison(monkeypatch, set(range(5, 100)))
    with pytest.raises(AnomalyStop, match=r"last at step 7\); stopping: the last rollback went to step 4 as well, "
                                          r"and the run has not got past the step where the bad steps before it "
                                          r"ended \(7\) since"):
        run(make_config(overrides(tmp_path / "run", train__save_every=2, anomaly__max_consecutive=3)))
    history = read_metrics(tmp_path / "run")
    assert [(r["step"], r["to_step"]) for r in history if r.get("event") == "rollback"] == [(7, 4)]


def test_a_second_streak_after_the_run_got_past_the_first_rolls_back_again(reference, tmp_path, monkeypatch):
    """Bad steps 10-12 roll back to checkpoint 8; steps 9-13 then train, and other bad batches
    make steps 14-16 fail. That is not the state failing again, yet the run stopped with exit
    code 3 ("has not got past it since"): any second rollback to the same checkpoint did."""
    overrides, _ = reference
    _poison(monkeypatch, {10, 11, 12, 18, 19, 20})  # train-step calls
    result = run(make_config(overrides(tmp_path / "run", train__max_steps=24, train__save_every=8,
                                       train__eval_every=0, anomaly__max_consecutive=3)))
    assert [(r["step"], r["to_step"]) for r in result.history if r.get("event") == "rollback"] == [(12, 8), (16, 8)]
    assert result.stop_reason == "completed" and result.step == 24 and result.loop.rollbacks == 2


def test_a_checkpoint_saved_at_a_stop_changes_neither_rollbacks_nor_what_is_kept(reference, tmp_path, monkeypatch):
    """A stop at step 5 saves checkpoint 5, off the save schedule. With keep=1 it pushed out
    checkpoint 4, and bad steps 6-8 after the resume rolled back to 5 (or found nothing to
    roll back to) where the uninterrupted run rolls back to 4: the resumed run was another
    run (found by a resume torture test; it ended in exit code 3 where the other completed)."""
    overrides, _ = reference
    settings = dict(anomaly__max_consecutive=3, checkpoint__keep=1)
    _poison(monkeypatch, {6, 7, 8})  # train-step calls: steps 6-8 in one process
    straight = run(make_config(overrides(tmp_path / "straight", **settings)))
    assert [(r["step"], r["to_step"]) for r in straight.history if r.get("event") == "rollback"] == [(8, 4)]

    config = make_config(overrides(tmp_path / "run", **settings))
    monkeypatch.undo()
    assert run(config, should_stop=lambda step: step == 5).step == 5
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4", "5"]  # 4 is kept: 5 is a stop's
    _poison(monkeypatch, {1, 2, 3})  # the resumed process's calls for steps 6-8
    resumed = run(config)
    assert _comparable(resumed.history) == _comparable(straight.history)
    assert_trees_equal(resumed.params, straight.params)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["12"]  # 5 went with the next save


def test_a_stop_at_the_last_step_saves_the_runs_own_last_checkpoint(reference, tmp_path):
    """The last step's checkpoint was marked as a stop's, so it was not counted by keep and
    the resumed run (which saves nothing more) kept checkpoint 8 as well, for good."""
    overrides, _ = reference
    config = make_config(overrides(tmp_path / "run", train__max_steps=10, checkpoint__keep=1))
    assert run(config, should_stop=lambda step: step == 10).stop_reason == "preempted"
    assert run(config).stop_reason == "completed"
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["10"]  # as in a run that was not stopped


def test_a_deletion_cut_short_leaves_no_half_deleted_checkpoint(reference, tmp_path, monkeypatch):
    """Orbax deleted a replaced checkpoint in place, so a process killed during the deletion
    left a step directory with part of its files. The next start took a half-deleted best/20
    for the best model and deleted the complete best/24 after it. Steps are now renamed out
    of sight first; here every deletion stops after its first file, as a kill would."""
    overrides, _ = reference
    real_rmtree = shutil.rmtree

    def cut_short(path, *args, **kwargs):
        for root, _, files in os.walk(path):
            if files:
                os.remove(os.path.join(root, files[0]))
                return

    monkeypatch.setattr(shutil, "rmtree", cut_short)
    scripted = iter([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])  # every evaluation better: best/ is replaced each time
    original = jaxtune.train.evaluate
    monkeypatch.setattr(jaxtune.train, "evaluate", lambda *a: dataclasses.replace(original(*a), loss=next(scripted)))
    workdir = tmp_path / "run"
    run(make_config(overrides(workdir, train__eval_every=2, train__save_every=2, checkpoint__keep=1)))
    steps = lambda name: sorted(n for n in os.listdir(workdir / name) if n.isdigit())  # noqa: E731
    assert steps("checkpoints") == ["12"] and steps("best") == ["12"]
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    Checkpointer(str(workdir), keep=1, keep_best=1, metric="eval_loss", greater_is_better=False)  # a next start
    assert os.listdir(workdir / "checkpoints") == ["12"] and os.listdir(workdir / "best") == ["12"]


def test_a_best_model_whose_save_did_not_complete_is_saved_again_on_resume(reference, tmp_path, monkeypatch):
    """checkpoints/8 committed, best/8 not (the two managers write independently): the resume
    adopted best/4 or, with nothing left in best/, failed at load_best_at_end every time."""
    overrides, _ = reference
    original = jaxtune.train.evaluate
    losses = {4: 5.0, 8: 3.0, 12: 4.0}
    holder = {}

    def evaluate(*args):
        return dataclasses.replace(original(*args), loss=losses[holder["loop"].step])

    monkeypatch.setattr(jaxtune.train, "evaluate", evaluate)
    init = jaxtune.train._Loop.__init__

    def remember(self, *args):
        holder["loop"] = self
        init(self, *args)

    monkeypatch.setattr(jaxtune.train._Loop, "__init__", remember)
    whole = run(make_config(overrides(tmp_path / "whole", train__load_best_at_end=True)))
    config = make_config(overrides(tmp_path / "run", train__load_best_at_end=True))
    run(config, should_stop=lambda step: step == 8)
    shutil.rmtree(tmp_path / "run" / "best" / "8")
    result = run(config)
    assert (result.loop.best.step, result.loop.best.value) == (8, 3.0)
    assert sorted(os.listdir(tmp_path / "run" / "best")) == ["8"]
    assert_trees_equal(result.params, whole.params)  # load_best_at_end: step 8's parameters, as uninterrupted


def test_a_signal_during_an_evaluation_stops_at_that_step(reference, tmp_path, monkeypatch):
    overrides, _ = reference
    original = jaxtune.train.evaluate

    def evaluate(*args):
        result = original(*args)
        os.kill(os.getpid(), signal.SIGTERM)  # as a preemption notice arriving mid-evaluation
        return result

    monkeypatch.setattr(jaxtune.train, "evaluate", evaluate)
    result = run(make_config(overrides(tmp_path / "run", train__save_every=100)))
    assert result.stop_reason == "preempted" and result.step == 4  # not one more step and checkpoint
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4"]


SIGNAL_WHILE_COMPILING = """
import os, signal, sys
sys.path.insert(0, {root!r})
import jaxtune.train
from jaxtune.config import load_recipe
compile_steps = jaxtune.train._Loop._compile_steps
def interrupted(self):
    os.kill(os.getpid(), signal.SIGINT)  # handled once the compilation returns to Python
    compile_steps(self)
jaxtune.train._Loop._compile_steps = interrupted
jaxtune.train.run(load_recipe({recipe!r}))
"""


def test_ctrl_c_during_compilation_exits_without_training(reference, tmp_path):
    """Compiled lazily, the first step compiled under the loop's handler: Ctrl-C waited for
    it, trained step 1, saved it and exited 0."""
    overrides, _ = reference
    recipe = write_recipe(tmp_path / "recipe.py", overrides(tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_COMPILING.format(root=ROOT, recipe=recipe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    assert "SIGINT received before training started: exiting" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints") or not os.listdir(tmp_path / "run" / "checkpoints")


def test_the_same_command_after_a_completed_run_changes_nothing(reference, tmp_path, capsys):
    overrides, _ = reference
    # The last step is a save step but not an eval step: the final eval comes after the periodic save.
    config = make_config(overrides(tmp_path / "run", train__max_steps=6, train__eval_every=0, train__save_every=3))
    first = run(config)
    assert first.stop_reason == "completed" and "eval_loss" in first.history[-1]
    again = run(config)  # used to fail: the checkpoint lacked the final eval, and best/6 existed
    assert again.stop_reason == "completed" and again.step == 6
    assert _comparable(again.history) == _comparable(first.history)
    assert _comparable(read_metrics(tmp_path / "run")) == _comparable(first.history)
    assert "warning: resuming" not in capsys.readouterr().out  # the same settings: nothing to point out


def test_a_resume_with_other_settings_names_each_change(reference, tmp_path, capsys, monkeypatch):
    """A resume takes whatever the command now says (a longer run, another learning rate),
    and config.json was silently replaced by it: a setting changed by mistake went unnoticed."""
    overrides, _ = reference

    def config(**kw):
        return make_config(overrides(tmp_path / "run", train__eval_every=0, train__save_every=2, **kw))

    with monkeypatch.context() as m:  # a checkpoint from before LoopState held the config: config.json tells
        m.setattr(LoopState, "to_json", lambda self: {k: v for k, v in dataclasses.asdict(self).items()
                                                      if k != "config"})
        run(config(train__max_steps=2))
    capsys.readouterr()
    assert run(config(train__max_steps=3, optimizer__lr=1e-3)).step == 3
    out = capsys.readouterr().out
    assert ("warning: resuming from step 2 with settings other than those its checkpoint was trained with: "
            "optimizer.lr 0.003 -> 0.001; train.max_steps 2 -> 3 (config.json now holds the new ones).") in out
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["optimizer"]["lr"] == 1e-3
    # A start that ended before its first step (Ctrl-C while compiling) rewrote config.json, and
    # the next start compared with that: here a warning of lr 0.5 -> 0.001 for a run trained at
    # 0.001 throughout. The checkpoint's own record is compared instead.
    with open(tmp_path / "run" / "config.json") as f:
        rewritten = json.load(f)
    rewritten["optimizer"]["lr"] = 0.5
    with open(tmp_path / "run" / "config.json", "w") as f:
        json.dump(rewritten, f)
    assert run(config(train__max_steps=4, optimizer__lr=1e-3)).step == 4
    out = capsys.readouterr().out
    assert ("settings other than those its checkpoint was trained with: train.max_steps 3 -> 4 (config.json now "
            "holds the new ones).") in out
    # A start that trains no step but saves the restored one again at its end (it was a stop's,
    # off the schedule) did record its own settings in that checkpoint.
    assert run(config(train__max_steps=6, optimizer__lr=1e-3), should_stop=lambda step: step == 5).step == 5
    assert run(config(train__max_steps=5, optimizer__lr=0.5)).stop_reason == "completed"
    # How a command starts (another workdir, resume, overwrite, the bar) is not a setting the
    # checkpoint was trained with: a copied run warned about its new workdir.
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    capsys.readouterr()
    copied = make_config(overrides(tmp_path / "copy", train__eval_every=0, train__save_every=2, train__max_steps=6,
                                   optimizer__lr=1e-3, logging__progress_bar=True))
    assert run(copied).step == 6
    assert "warning: resuming" not in capsys.readouterr().out


def test_persistent_anomalies_can_stop_the_run(reference, tmp_path, monkeypatch):
    overrides, _ = reference
    _poison(monkeypatch, {6, 7, 8})
    with pytest.raises(AnomalyStop, match="3 consecutive steps were skipped.*last good checkpoint is in"):
        run(make_config(overrides(tmp_path / "run", anomaly__max_consecutive=3, anomaly__on_persistent="stop")))


def test_persistent_anomalies_before_the_first_checkpoint_stop_and_say_why(reference, tmp_path, monkeypatch):
    overrides, _ = reference
    _poison(monkeypatch, {6, 7, 8})
    with pytest.raises(AnomalyStop, match=r"skipped as anomalous \(last at step 8\); stopping: there is no checkpoint"):
        run(make_config(overrides(tmp_path / "run", anomaly__max_consecutive=3, train__save_every=10)))


DRIVER = """
import sys
sys.path.insert(0, {root!r})
from jaxtune.config import load_recipe
from jaxtune.train import run
result = run(load_recipe({recipe!r}), should_stop=lambda step: step == 6)
assert result.stop_reason == "preempted", result.stop_reason
"""


@pytest.mark.slow
@pytest.mark.parametrize("devices", [4, 1])
def test_resume_on_more_devices(reference, tmp_path, devices):
    overrides, ref = reference
    workdir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.py", overrides(workdir))  # mesh.fsdp=-1: all devices
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(root=ROOT, recipe=recipe)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"'fsdp': {devices}" in proc.stdout
    result = run(make_config(overrides(workdir)))  # here: 8 devices
    ours, theirs = train_losses(result.history), train_losses(ref.history)
    assert ours.keys() == theirs.keys()
    np.testing.assert_allclose([ours[s] for s in ours], [theirs[s] for s in ours], atol=1e-5)


def test_a_fresh_start_clears_best_models_of_a_run_that_died_before_its_first_checkpoint(reference, tmp_path):
    overrides, _ = reference
    config = make_config(_unstable(overrides, tmp_path / "run", max_steps=6, train__save_every=100))
    first = run(config)
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # what a kill before the first save leaves
    assert os.listdir(tmp_path / "run" / "best")
    again = run(config)  # used to fail: best/<step> already existed
    assert _comparable(again.history) == _comparable(first.history)
    # With another config, best/ holds only what this run produced. Killed again before its
    # first save, the 6-step run leaves its best model, of a step this run never evaluates and
    # better than anything it reaches (2 steps at a learning rate that hardly moves the
    # weights): under keep_best=1 that leftover would win.
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    changed = run(make_config(overrides(tmp_path / "run", train__max_steps=2, train__eval_every=2, train__seed=1,
                                        train__save_every=100, optimizer__lr=1e-6, train__load_best_at_end=True)))
    evals = {r["step"]: r["eval_loss"] for r in changed.history if "eval_loss" in r}
    assert list(evals) == [2] and changed.loop.best.step == 2
    assert again.loop.best.step > 2 and again.loop.best.value < evals[2]
    ckpt = Checkpointer(str(tmp_path / "run"), keep=2, keep_best=1, metric="eval_loss", greater_is_better=False)
    assert ckpt.best_manager.all_steps() == [2]
    assert ckpt._best_meta(2)["value"] == evals[2]
    # Like with like: at the step both runs evaluated, the other config's eval loss differs.
    other_evals = {r["step"]: r["eval_loss"] for r in again.history if "eval_loss" in r}
    assert abs(other_evals[2] - evals[2]) > 1e-4, (other_evals, evals)


@pytest.mark.parametrize("on_corrupt", ["error", "fallback"])
def test_a_config_change_is_named_and_never_taken_for_corruption(reference, tmp_path, on_corrupt):
    overrides, _ = reference
    run(make_config(overrides(tmp_path / "run", train__save_every=2)), should_stop=lambda step: step == 4)
    ckpts = tmp_path / "run" / "checkpoints"
    before = sorted(os.listdir(ckpts))
    changed = make_config(overrides(tmp_path / "run", model__param_dtype="bfloat16", checkpoint__on_corrupt=on_corrupt))
    with pytest.raises(UserError, match=r"checkpoints/4 was written with another configuration: params\..* is "
                                        r"float32\[.*\] there and bfloat16\[.*\] here \(model.hf_path or "
                                        r"model.param_dtype changed\?\)"):
        run(changed)
    no_clip = make_config(overrides(tmp_path / "run", optimizer__max_grad_norm=0.0, checkpoint__on_corrupt=on_corrupt))
    with pytest.raises(UserError, match=r"written with another configuration: opt_state\..* \(an optimizer setting"):
        run(no_clip)
    assert sorted(os.listdir(ckpts)) == before  # nothing set aside
    assert run(make_config(overrides(tmp_path / "run"))).step == 12  # the original config resumes


def test_a_resume_with_another_anomaly_window_continues(reference, tmp_path, capsys):
    """The guard's window is part of the state, so a changed `anomaly.window` used to refuse
    the resume; it now keeps the newest losses (below). With the guard's spike test off the
    window decides nothing, so the run continues exactly as the uninterrupted one."""
    overrides, ref = reference
    run(make_config(overrides(tmp_path / "run")), should_stop=lambda step: step == 4)
    resumed = run(make_config(overrides(tmp_path / "run", anomaly__window=16)))
    assert resumed.step == 12 and _comparable(resumed.history) == _comparable(ref.history)
    assert "anomaly.window 32 -> 16" in capsys.readouterr().out


@pytest.mark.parametrize("length", [8, 2])
def test_a_restored_window_of_another_length_keeps_the_newest_losses(tmp_path, length):
    from jaxtune.state import TrainState

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    losses = np.full(4, np.nan, np.float32)
    losses[1:] = [3.0, 2.0, 1.0]  # three applied steps, oldest first
    zero = np.zeros((), np.int32)
    state = TrainState(step=zero, applied=zero, params={"w": np.ones(3, np.float32)}, opt_state=(),
                       loss_window=losses, skipped=zero, consecutive_skipped=zero)
    ckpt = Checkpointer(str(tmp_path / "w"), keep=1, keep_best=1, metric="eval_loss", greater_is_better=False)
    ckpt.save(3, jax.device_put(state, device), LoopState())
    ckpt.manager.wait_until_finished()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=device), state)
    abstract = abstract.replace(loss_window=jax.ShapeDtypeStruct((length,), np.float32, sharding=device))
    step, restored, _ = ckpt.restore_latest(abstract)
    expected = {8: [np.nan] * 5 + [3.0, 2.0, 1.0], 2: [2.0, 1.0]}[length]
    np.testing.assert_array_equal(np.asarray(restored.loss_window), np.array(expected, np.float32))
    assert step == 3 and restored.loss_window.sharding == device


def test_resuming_with_another_order_of_batches_is_refused(reference, tmp_path):
    overrides, _ = reference
    run(make_config(overrides(tmp_path / "run")), should_stop=lambda step: step == 4)
    with pytest.raises(UserError, match=re.escape(
            "checkpoints/4 was written for another order of training batches (train.global_batch_size was 8, "
            "now 16; train.seed was 0, now 1), so its data position would skip or repeat data")):
        run(make_config(overrides(tmp_path / "run", train__global_batch_size=16, train__seed=1)))
    assert run(make_config(overrides(tmp_path / "run"))).step == 12  # the original settings resume


def test_resuming_with_other_data_packed_into_as_many_rows_is_refused(reference, run_assets, tmp_path):
    """One answer changed, same token count: the rows are as many, but other rows."""
    overrides, _ = reference
    train = tmp_path / "train.jsonl"
    shutil.copy(run_assets.train, train)
    config = make_config(overrides(tmp_path / "run", data__train_files=(str(train),)))
    run(config, should_stop=lambda step: step == 4)
    records = [json.loads(line) for line in train.read_text().splitlines()]
    changed = next(r for r in records if r["messages"][-1]["content"].isdigit()
                   and r["messages"][-1]["content"] != r["messages"][-1]["content"][::-1])
    changed["messages"][-1]["content"] = changed["messages"][-1]["content"][::-1]  # "74" -> "47": as many tokens
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(UserError, match=re.escape(
            "checkpoints/4 was written for another order of training batches (the training rows' content differs "
            "(data, tokenizer or data settings)), so its data position would skip or repeat data")):
        run(config)


def test_resuming_with_another_best_model_metric_is_refused(reference, tmp_path):
    """The saved best value is an eval_loss: compared with accuracies, the run trained to the
    end and then failed with a KeyError restoring the best model."""
    overrides, _ = reference
    run(make_config(overrides(tmp_path / "run")), should_stop=lambda step: step == 4)
    with pytest.raises(UserError, match=re.escape(
            "checkpoints/4 chose its best model by eval_loss, now checkpoint.metric=eval_accuracy; resume with "
            "checkpoint.metric=eval_loss, or use a new workdir.")):
        run(make_config(overrides(tmp_path / "run", checkpoint__metric="eval_accuracy")))
    # The other direction for the same metric: the saved best loss, compared as if higher were
    # better, was replaced by a worse evaluation (and best/ with it), with only a warning.
    with pytest.raises(UserError, match=re.escape(
            "checkpoints/4 chose its best model with checkpoint.greater_is_better=False, now True; resume with "
            "checkpoint.greater_is_better=False, or use a new workdir.")):
        run(make_config(overrides(tmp_path / "run", checkpoint__greater_is_better=True)))
    assert run(make_config(overrides(tmp_path / "run", checkpoint__greater_is_better=False))).step == 12


def test_best_model_settings_may_change_on_resume_while_no_best_model_was_chosen(reference, tmp_path):
    """Without eval data the start-up warns that greater_is_better changes nothing; dropping it
    then refused the resume ("chose its best model with ..."), though none was chosen."""
    overrides, _ = reference
    no_eval = dict(data__eval_files=(), data__eval_fraction=0.0, train__eval_every=0)
    run(make_config(overrides(tmp_path / "run", checkpoint__greater_is_better=True, checkpoint__metric="eval_ppl",
                              **no_eval)), should_stop=lambda step: step == 4)
    assert run(make_config(overrides(tmp_path / "run", **no_eval))).step == 12


def test_the_same_command_after_early_stopping_trains_no_more(reference, tmp_path):
    overrides, _ = reference
    config = make_config(_unstable(overrides, tmp_path / "es", early_stopping__patience=2))
    stopped = run(config)
    assert stopped.stop_reason == "early_stopping" and stopped.step < 16
    again = run(config)
    assert again.stop_reason == "early_stopping" and again.step == stopped.step
    assert again.history == stopped.history
    assert read_metrics(tmp_path / "es") == stopped.history


@pytest.mark.parametrize("patience", [0, 9])
def test_a_larger_patience_or_none_continues_an_early_stopped_run(reference, tmp_path, patience):
    """Every later command said "nothing more to train", also with early stopping turned off or
    more patience, so an early-stopped run could never be continued."""
    overrides, _ = reference
    stopped = run(make_config(_unstable(overrides, tmp_path / "es", early_stopping__patience=2)))
    assert stopped.stop_reason == "early_stopping" and stopped.step < 16
    more = run(make_config(_unstable(overrides, tmp_path / "es", early_stopping__patience=patience)))
    assert more.stop_reason == "completed" and more.step == 16 and not more.loop.stopped_early
    evals = [r["step"] for r in more.history if "eval_loss" in r]
    assert evals == list(range(2, 17, 2))  # each step evaluated once, on from the stop


def test_log_lines_after_a_restart_average_the_same_steps(reference, tmp_path):
    overrides, _ = reference
    whole = run(make_config(overrides(tmp_path / "whole", train__log_every=4)))
    config = make_config(overrides(tmp_path / "run", train__log_every=4))
    assert run(config, should_stop=lambda step: step == 5).stop_reason == "preempted"  # mid-interval
    resumed = run(config)
    assert [r["step"] for r in resumed.history if "loss" in r] == [4, 8, 12]
    assert _comparable(resumed.history) == _comparable(whole.history)


def test_rollback_reuses_a_batch_fetched_after_the_bad_ones(reference, tmp_path, monkeypatch):
    overrides, _ = reference
    _poison(monkeypatch, {5, 6, 7})
    result = run(make_config(overrides(tmp_path / "run", anomaly__max_consecutive=3, train__log_every=4)))
    assert [(r["step"], r["to_step"]) for r in result.history if r.get("event") == "rollback"] == [(7, 4)]
    # 7 batches before the rollback to step 4 (batch 8 was fetched, then handed back), 8 after.
    assert result.step == 12 and (result.loop.epoch, result.loop.batch_index) == (0, 15)


def test_evaluation_time_is_not_counted_as_training_time(reference, tmp_path, monkeypatch):
    overrides, _ = reference
    original = jaxtune.train.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(4.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(jaxtune.train, "evaluate", slow_evaluate)
    result = run(make_config(overrides(tmp_path / "run", train__log_every=4, train__eval_every=6)))
    tps = {r["step"]: r["tokens_per_sec"] for r in result.history if "loss" in r}
    # Steps 5-8 include the evaluation at step 6; counted, it would cut their rate ~15x. They
    # also share the cores with the background writes of checkpoint 4 and best/6, which once
    # made them 3.6x slower in the full suite (8 fake devices on 2 cores): hence the margin.
    assert tps[8] > 0.2 * tps[4], tps


def test_tensorboard_and_wandb_after_a_restart_describe_one_run(reference, tmp_path, monkeypatch):
    import sys
    import types

    overrides, _ = reference
    inits, logged = [], []
    fake = types.ModuleType("wandb")
    fake.login = lambda **kw: True
    fake.init = lambda **kw: inits.append(kw) or fake
    fake.log = lambda data, step: logged.append(step)
    fake.finish = lambda: None
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = make_config(overrides(tmp_path / "run", logging__wandb=True))
    run(config, should_stop=lambda step: step == 6)
    # What a kill after logging step 6 leaves when the last checkpoint is step 4.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")
    result = run(config)
    losses = tensorboard_scalars(tmp_path / "run", "loss")
    assert [s for s, _ in losses] == list(range(1, 13))  # each step once: none lost, none doubled
    np.testing.assert_allclose([v for _, v in losses], [train_losses(result.history)[s] for s in range(1, 13)],
                               rtol=1e-6)
    assert [s for s, _ in tensorboard_scalars(tmp_path / "run", "eval_loss")] == [4, 8, 12]
    assert len(inits) == 2 and inits[0]["id"] is not None and inits[1]["id"] == inits[0]["id"]
    assert inits[1]["resume"] == "allow"


def test_the_batch_order_of_old_checkpoints_and_of_another_process_count():
    from jaxtune.state import DataOrder, LoopState

    old = LoopState.from_json({"data_order": {"global_batch_size": 8, "seed": 0, "rows": 1450}})
    assert old.data_order == DataOrder(8, 0, 1450, None)  # written before processes were recorded: unknown
    assert DataOrder(8, 0, 1450, 2).changes_from(old.data_order) == []
    assert DataOrder(8, 0, 1450, 1).changes_from(DataOrder(8, 0, 1450, 2)) == ["the number of processes was 2, now 1"]
    assert DataOrder(8, 0, 1450, 2, "ab").changes_from(old.data_order) == []  # content unknown there too
    # Another process count packs other rows and another digest: that is its only reason, not "the data".
    assert DataOrder(8, 0, 1460, 2, "cd").changes_from(DataOrder(8, 0, 1450, 1, "ab")) == [
        "the number of processes was 1, now 2"]
    assert DataOrder(8, 0, 1460, 2, "cd").changes_from(DataOrder(8, 0, 1450, 2, "ab")) == [
        "the number of training rows (data or data settings) was 1450, now 1460",
        "the training rows' content differs (data, tokenizer or data settings)"]
