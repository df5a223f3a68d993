"""The training run: data -> sharded state (fresh or resumed) -> the loop -> final eval.

`run(config)` is what `python run.py` calls. The loop itself (`_Loop.train`) is short;
setup and the per-step bookkeeping are separate methods so each reads on one screen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune import distributed, sharding
from jaxtune.checkpoint import AT_STOP, IN_STREAK, TMP_MARKER, Checkpointer, corrupt_steps, no_checkpoint_left
from jaxtune.config import (
    MAX_STEPS, expand_user_paths, has_eval_data, metric_greater_is_better, settings_without_effect, validate,
)
from jaxtune.errors import UserError
from jaxtune.evaluate import EvalResult, evaluate
from jaxtune.flops import flops_per_token, peak_flops_per_device
from jaxtune.logging import RunLogger, check_wandb_login
from jaxtune.models.hf_io import abstract_model, check_checkpoint, load_params
from jaxtune.models.llama import LlamaConfig
from jaxtune.optim import OptimizerSettings, build_optimizer, lr_schedule, num_warmup_steps
from jaxtune.preemption import ExitOnSignal, StopRequest
from jaxtune.state import DataOrder, IntervalState, LoopState, TrainState
from jaxtune.steps import (
    StepSettings, abstract_batch, abstract_train_state, fetch_metrics, make_eval_step, make_train_step,
    to_global_batch,
)


class AnomalyStop(UserError):
    exit_code = 3


@dataclasses.dataclass
class RunResult:
    workdir: str
    step: int
    stop_reason: str  # completed | early_stopping | preempted
    history: list[dict[str, Any]]
    params: Any  # the final parameters (the best ones with train.load_best_at_end)
    loop: LoopState


def _check_token_ids(data, vocab_size: int, tokenizer_path: str, tokenizer_size: int, model_path: str) -> None:
    """Token ids the embedding does not cover would make every step's loss NaN (and be skipped)."""
    rows = [r for r in (data.train, data.eval) if r is not None and len(r)]
    local = max((int(max(r.input_ids.max(), r.targets.max())) for r in rows), default=0)
    largest = distributed.global_max(local)
    if largest >= vocab_size:
        raise UserError(
            f"the data has token id {largest}, but the model has only {vocab_size} embeddings "
            f"(vocab_size in {os.path.join(model_path, 'config.json')}): the tokenizer at {tokenizer_path} "
            f"({tokenizer_size} tokens) does not match this model."
        )


# What a run writes into its workdir. `resume=never` + `overwrite` deletes only these (the data
# cache is reused by design, and anything else in the directory is the user's).
RUN_OUTPUTS = ("checkpoints", "best", "metrics.jsonl", "tensorboard", "config.json", "curves.png", "wandb")


def _previous_outputs(workdir: str) -> list[str]:
    return [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(workdir, n))]


def _writable_workdir(path: str) -> None:
    """Created now, so that a path that cannot be written fails in one line before any data work."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"workdir {path} cannot be created: {e.strerror}.") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"workdir {path} is not writable.")


def _check_workdir(config) -> bool:
    """Applies train.resume; True when there is a checkpoint to resume from.

    With `resume=never`, a previous run's outputs are refused unless `train.overwrite`; they
    are deleted later (`_clear_previous_outputs`), once the data has been read and checked and
    the weights have loaded.
    """
    workdir = config.workdir
    _writable_workdir(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    has_ckpt = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
    if config.train.resume == "auto":
        if not has_ckpt:
            _refuse_lost_checkpoints(config, ckpt_dir)
        return has_ckpt
    outputs = _previous_outputs(workdir)
    if outputs and not config.train.overwrite:
        raise UserError(
            f"workdir {workdir} holds a previous run's outputs ({', '.join(outputs)}) and train.resume=never; "
            "choose another workdir or set --config.train.overwrite=True to delete them."
        )
    return False


def _refuse_lost_checkpoints(config, ckpt_dir: str) -> None:
    """A workdir with no checkpoint starts over, which replaces `best/` and `metrics.jsonl`:
    right after a run that died before its first checkpoint, not when the run had
    checkpoints that were all found unreadable, or deleted (its best model is from a step at
    or past the first scheduled save)."""
    corrupt = corrupt_steps(ckpt_dir)
    if corrupt:
        raise UserError(no_checkpoint_left(ckpt_dir, corrupt))
    best_dir = os.path.join(config.workdir, "best")
    best = [int(n) for n in os.listdir(best_dir) if n.isdigit()] if os.path.isdir(best_dir) else []
    # a first save the process died in (the best model of its step is smaller, done sooner)
    interrupted = os.path.isdir(ckpt_dir) and any(TMP_MARKER in n for n in os.listdir(ckpt_dir))
    if best and max(best) >= config.train.save_every and not interrupted:
        raise UserError(
            f"workdir {config.workdir} has no checkpoint to resume from, but best/{max(best)} is from a step at or "
            f"past the first save (train.save_every={config.train.save_every}): the run's checkpoints were deleted? "
            "Starting over would replace its best model and metrics; use train.resume=never with "
            "train.overwrite=True to start over, or another workdir."
        )


def _clear_previous_outputs(workdir: str) -> None:
    if jax.process_index() == 0:
        for name in _previous_outputs(workdir):
            path = os.path.join(workdir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    distributed.barrier("previous outputs deleted")  # before any process writes new ones


def _resolved_config(config, mesh_sizes, settings) -> dict:
    d = config.to_dict()
    d["mesh"] = dict(zip(sharding.AXES, mesh_sizes))
    d["data"]["tokenizer_path"] = settings.tokenizer_path
    d["data"]["cache_dir"] = settings.cache_dir
    d["checkpoint"]["greater_is_better"] = metric_greater_is_better(config)
    return d


COMMAND_ONLY_KEYS = ("workdir", "train.resume", "train.overwrite", "logging.progress_bar")


def _changed_settings(previous: dict | None, resolved: dict) -> list[str]:
    """`key old -> new` for each setting of `resolved` (as read back from its JSON, so tuples
    are lists) that differs from `previous`, the settings the resumed checkpoint was trained
    with: a resume continues with whatever the command now says (a longer run, a lower
    learning rate), and a setting changed by mistake should not pass unnoticed. Nothing
    without them (a checkpoint from before they were recorded, and no readable config.json)."""
    if previous is None:
        return []

    def flat(d, prefix=""):
        out = {}
        for key, value in d.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    before, after = flat(previous), flat(resolved)
    for key in COMMAND_ONLY_KEYS:  # how this command starts, not how the run trains
        before.pop(key, None), after.pop(key, None)
    missing = object()
    return [f"{key} {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
            for key in sorted(before.keys() | after.keys()) if before.get(key, missing) != after.get(key, missing)]


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run(config, *, should_stop: Callable[[int], bool] | None = None) -> RunResult:
    """Trains as `config` says. `should_stop(step)` is checked after each step like a SIGTERM."""
    expand_user_paths(config)
    validate(config)
    distributed.init()
    with ExitOnSignal():  # data, weights, compilation: nothing to save yet
        loop = _Loop(config, should_stop)
    with StopRequest() as stop:
        loop.stop_request = stop
        try:
            return loop.train()
        except BaseException:
            loop.log.close(plot=False)  # as a stop does (a no-op if it did): no writer thread, no open files
            raise


class _Loop:
    def __init__(self, config, should_stop):
        from jaxtune.data import BatchLoader, DataSettings, LoaderPosition, load_tokenizer, prepare_datasets
        from jaxtune.data.loader import too_few_rows

        self.config = c = config
        self.should_stop = should_stop
        self.stop_request: StopRequest | None = None
        self._skipped_in_a_row = 0  # skipped steps in a row up to the last step booked: a save then is off schedule
        t = c.train
        # Cheap checks first: the model's config, the mesh, the batch against the mesh.
        self.model_config = LlamaConfig.from_pretrained(c.model.hf_path)
        self.mesh = sharding.make_mesh(sharding.MeshShape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor))
        dp, procs = sharding.data_parallel_size(self.mesh), jax.process_count()
        sharding.check_rows_per_process(self.mesh, procs)  # dp is a multiple of procs from here on
        micro = t.global_batch_size // t.grad_accum_steps
        self.eval_batch = t.eval_batch_size or micro
        batches = [("train.global_batch_size / train.grad_accum_steps", micro)]
        if has_eval_data(c):  # without eval data the eval batch is never made
            batches.append(("train.eval_batch_size", self.eval_batch))
        for name, rows in batches:
            if rows % dp:  # and so of the processes
                raise UserError(
                    f"{name} = {rows} rows must be a multiple of the data-parallel size "
                    f"(mesh.data x mesh.fsdp = {dp})."
                )
        self.graphdef, abstract = abstract_model(
            self.model_config, param_dtype=c.model.param_dtype, compute_dtype=c.model.compute_dtype,
            remat=c.model.remat,
        )
        self.abstract_params = nnx.as_pure(abstract)
        sharding.tree_shardings(self.mesh, self.abstract_params)  # unshardable parameter -> UserError now
        # Names and shapes of the weights, before the workdir is touched or any data is read.
        check_checkpoint(c.model.hf_path, self.model_config, self.abstract_params, c.model.allow_pickle)
        resume = _check_workdir(c)
        # what a resume=auto start without a checkpoint replaces (a run that died before its first)
        left_behind = [] if resume or c.train.resume != "auto" else [
            n for n in _previous_outputs(c.workdir) if n not in ("checkpoints", "config.json")]
        check_wandb_login(c)

        # Data: validated and tokenized before any weight is loaded.
        self.data_settings = DataSettings.from_config(c)
        tokenizer = load_tokenizer(self.data_settings.tokenizer_path)
        log = print if distributed.is_main() else (lambda *a, **k: None)
        data = prepare_datasets(self.data_settings, tokenizer, process_index=jax.process_index(),
                                process_count=procs, log=log, gather=distributed.gather)
        _check_token_ids(data, self.model_config.vocab_size, self.data_settings.tokenizer_path,
                         len(tokenizer), c.model.hf_path)
        self.eval_rows = data.eval if has_eval_data(c) else None  # some process has rows: prepare_datasets checked
        usable_rows = distributed.global_min(len(data.train))
        if usable_rows < t.global_batch_size // procs:
            raise UserError(too_few_rows(usable_rows, t.global_batch_size, procs, self.data_settings.packing))
        self.loader = BatchLoader(data.train, t.global_batch_size // procs, t.seed, usable_rows=usable_rows)
        self.total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_epochs * self.loader.steps_per_epoch)
        if self.total_steps >= MAX_STEPS:
            raise UserError(f"train.num_epochs={t.num_epochs} makes {self.total_steps:,} steps; the step counters "
                            "are int32, so it must be below 2**31.")

        # Optimizer, state (resumed or fresh), compiled steps.
        opt_settings = OptimizerSettings.from_config(c.optimizer)
        self.optimizer = build_optimizer(opt_settings, self.total_steps)
        self.schedule = lr_schedule(opt_settings, self.total_steps)
        self.abstract_state, self.shardings = abstract_train_state(self.mesh, self.optimizer, self.abstract_params,
                                                                   c.anomaly.window)
        fresh = None
        if c.train.resume == "never":  # weights first: a bad model directory must not cost the old run
            fresh = self._fresh_state()
            _clear_previous_outputs(c.workdir)
        self.gib = metric_greater_is_better(c)
        self.ckpt = Checkpointer(c.workdir, keep=c.checkpoint.keep, keep_best=c.checkpoint.keep_best,
                                 metric=c.checkpoint.metric, greater_is_better=self.gib,
                                 on_corrupt=c.checkpoint.on_corrupt)
        restored = self.ckpt.restore_latest(self.abstract_state, log=log) if resume else None
        if restored is not None:
            self.step, self.state, self.loop = restored
            log(f"resuming from step {self.step} ({os.path.join(self.ckpt.directory, str(self.step))})")
        else:
            self.step, self.loop = 0, LoopState()
            if left_behind:
                log(f"no checkpoint to resume from in {self.ckpt.directory}: starting from step 0, replacing what a "
                    f"run that stopped before its first checkpoint left ({', '.join(left_behind)})")
            self.ckpt.discard_best_after(-1)  # left by a run that died before its first checkpoint
            self.state = fresh if fresh is not None else self._fresh_state()
        data_order = DataOrder(t.global_batch_size, t.seed, self.loader.usable_rows * procs, procs,
                               distributed.combined_digest(data.train.fingerprint()))
        if restored is not None and self.loop.data_order is not None:
            changes = data_order.changes_from(self.loop.data_order)
            if changes:
                raise UserError(
                    f"checkpoint {os.path.join(self.ckpt.directory, str(self.step))} was written for another order "
                    f"of training batches ({'; '.join(changes)}), so its data position would skip or repeat data; "
                    "resume with the settings it was written with, or use a new workdir."
                )
        if restored is not None and self.step > self.total_steps:  # after the data check: other data is its cause
            raise UserError(
                f"checkpoint {os.path.join(self.ckpt.directory, str(self.step))} is past the end of this run "
                f"({self.total_steps} steps"
                + (f", train.max_steps={t.max_steps}" if t.max_steps > 0 else f", train.num_epochs={t.num_epochs:g}")
                + "); resume with at least as many steps, or use a new workdir."
            )
        # Only when a best model was chosen: without one (no eval data, or none evaluated yet)
        # these settings have chosen nothing.
        chosen = restored is not None and self.loop.best.step is not None
        saved_metric, saved_direction = self.loop.best.metric, self.loop.best.greater_is_better
        if chosen and saved_metric is not None and saved_metric != c.checkpoint.metric:
            raise UserError(
                f"checkpoint {os.path.join(self.ckpt.directory, str(self.step))} chose its best model by {saved_metric}, "
                f"now checkpoint.metric={c.checkpoint.metric}; resume with checkpoint.metric={saved_metric}, or use a "
                "new workdir."
            )
        if chosen and saved_direction is not None and saved_direction != self.gib:
            raise UserError(
                f"checkpoint {os.path.join(self.ckpt.directory, str(self.step))} chose its best model with "
                f"checkpoint.greater_is_better={saved_direction}, now {self.gib}; resume with "
                f"checkpoint.greater_is_better={saved_direction}, or use a new workdir."
            )
        self.loop.best.metric, self.loop.best.greater_is_better = c.checkpoint.metric, self.gib
        self.loop.data_order = data_order
        self.loader.position = LoaderPosition(self.loop.epoch, self.loop.batch_index)
        step_settings = StepSettings(
            compute_dtype=jnp.dtype(c.model.compute_dtype), loss_chunk_len=c.model.loss_chunk_len,
            spike_factor=c.anomaly.spike_factor,
        )
        self.train_step = make_train_step(self.graphdef, self.optimizer, self.schedule, step_settings,
                                          self.mesh, self.shardings)
        self.eval_step = make_eval_step(self.graphdef, step_settings, self.mesh, self.shardings.params)

        text = json.dumps(_resolved_config(c, self.mesh.devices.shape, self.data_settings), indent=2)
        # Read back, as a checkpoint holds it (tuples are lists). Recorded in the checkpoint once
        # this start trains a step (a start that trains none, and re-saves the restored step at
        # its end, must not claim it); a rollback is always followed by a step.
        self._start_config = json.loads(text)
        config_path = os.path.join(c.workdir, "config.json")
        changed_settings = []
        if restored is not None:
            # config.json is the last start's, which may have ended before training a step.
            trained_with = self.loop.config if self.loop.config is not None else _read_json(config_path)
            changed_settings = _changed_settings(trained_with, self._start_config)
        if distributed.is_main():
            os.makedirs(c.workdir, exist_ok=True)
            with open(config_path, "w") as f:
                f.write(text)
        if self.loop.wandb_id is None:
            self.loop.wandb_id = uuid.uuid4().hex[:16]  # used (and checkpointed) by process 0 only
        self.log = RunLogger(c.workdir, c, total_steps=self.total_steps,
                             history=self.loop.history,  # one list: what is logged is checkpointed
                             wandb_id=self.loop.wandb_id)
        try:
            self._announce_and_compile(data.report, opt_settings, changed_settings)
        except BaseException:  # Ctrl-C while compiling, a compile error: no writer thread left behind
            self.log.close(plot=False)
            raise

    def _announce_and_compile(self, data_report, opt_settings, changed_settings) -> None:
        c = self.config
        self.log.message(data_report.summary())
        warmup = num_warmup_steps(opt_settings, self.total_steps)
        self.log.message(
            f"{self.model_config.num_params / 1e6:.1f}M parameters on mesh "
            f"{dict(zip(sharding.AXES, self.mesh.devices.shape))}; {self.total_steps} steps "
            f"({self.loader.steps_per_epoch} per epoch), warmup {warmup}"
        )
        if changed_settings:
            self.log.message(
                f"warning: resuming from step {self.step} with settings other than those its checkpoint was "
                f"trained with: {'; '.join(changed_settings)} (config.json now holds the new ones)."
            )
        self._warn_if_early_stopping_cannot_fire()
        for sentence in settings_without_effect(c):
            self.log.message(f"warning: {sentence}")
        if c.anomaly.spike_factor > 0 and c.anomaly.window >= self.total_steps:
            self.log.message(
                f"warning: anomaly.spike_factor={c.anomaly.spike_factor:g} cannot skip a step of this run: the guard "
                f"waits for anomaly.window={c.anomaly.window} applied losses, and the run has {self.total_steps} steps."
            )
        if warmup >= self.total_steps:
            source = (f"optimizer.warmup_steps={warmup}" if opt_settings.warmup_steps > 0
                      else f"{warmup} step(s) from optimizer.warmup_ratio={opt_settings.warmup_ratio:g}")
            outcome = ("its one update has learning rate 0, so the run changes no weight." if self.total_steps == 1
                       else f"the learning rate only rises and ends at {(self.total_steps - 1) / warmup:.3g} x "
                            "optimizer.lr, with no decay.")
            self.log.message(f"warning: the warmup ({source}) is not shorter than the run ({self.total_steps} steps): "
                             f"{outcome}")
        context, positions = self.model_config.context_length, self.model_config.max_position_embeddings
        if c.data.max_seq_len > context:  # RoPE computes any position
            self.log.message(
                f"warning: data.max_seq_len={c.data.max_seq_len} is longer than the model's context ({context}: "
                f"max_position_embeddings={positions}"
                + (f" x linear RoPE factor {self.model_config.rope_scaling.factor:g}" if context != positions else "")
                + f" in {c.model.hf_path}/config.json): positions past it were never trained, so this is context "
                "extension" + ("." if self.model_config.rope_scaling else
                               ", which usually also needs RoPE scaling (rope_scaling in config.json).")
            )
        if c.model.param_dtype == "bfloat16":
            self.log.message(
                "warning: model.param_dtype=bfloat16 keeps the weights and Adam's state in bfloat16, where an update "
                "smaller than ~1/256 of a weight is lost (norm weights near 1 do not move at learning rates below "
                "~4e-3); float32 weights with model.compute_dtype=bfloat16 train as the HF Trainer's bf16=True does."
            )
        self.flops_per_token = flops_per_token(self.model_config, c.data.max_seq_len)
        self.peak = peak_flops_per_device(c.model.compute_dtype, c.logging.peak_flops)
        self._compile_steps()

    def _compile_steps(self) -> None:
        """Compiles the steps here, where a signal still exits at once: compiled lazily, the
        first step compiled under the training loop's handler, so Ctrl-C during a long compile
        waited for it, trained step 1 and saved it. jit reuses these executables."""
        c, started = self.config, time.perf_counter()
        seq = c.data.max_seq_len
        self.train_step.lower(self.state, abstract_batch(self.mesh, c.train.global_batch_size, seq,
                                                         c.train.grad_accum_steps)).compile()
        if self.eval_rows is not None:
            self.eval_step.lower(self.state.params, abstract_batch(self.mesh, self.eval_batch, seq, None)).compile()
        self.log.message(f"compiled the train{' and eval' if self.eval_rows is not None else ''} steps "
                         f"in {time.perf_counter() - started:.1f} s")

    def _fresh_state(self) -> TrainState:
        c = self.config
        params = load_params(
            c.model.hf_path, self.abstract_params, self.model_config,
            sharding_fn=sharding.param_sharding_fn(self.mesh), allow_pickle=c.model.allow_pickle,
        )
        create = jax.jit(
            lambda p: TrainState.create(p, self.optimizer.init(p), c.anomaly.window),
            in_shardings=(self.shardings.params,), out_shardings=self.shardings,
        )
        return create(params)

    # ---- the loop ------------------------------------------------------------------------
    def train(self) -> RunResult:
        es, patience = self.loop.early_stopping, self.config.early_stopping.patience
        if self.loop.stopped_early and es.should_stop(patience):  # the same command again: nothing to train
            self.log.message(
                f"this run stopped early at step {self.step} ({es.bad_evals} evaluations without improvement, "
                f"early_stopping.patience={patience}); nothing more to train (a larger patience, or 0, trains on)"
            )
            return self._finish("early_stopping")
        self.loop.stopped_early = False  # a larger patience (or none) continues the run
        reason = "completed"
        self._interval = _Interval(self.loop.interval)
        self.log.start_progress(self.step)
        pending = None
        while self.step < self.total_steps:
            rows = self.loader.next_batch()
            batch = to_global_batch(rows, self.mesh, self.config.train.grad_accum_steps)
            self.state, metrics = self.train_step(self.state, batch)
            self.step += 1
            self.loop.config = self._start_config
            self.loop.epoch, self.loop.batch_index = self.loader.position.epoch, self.loader.position.batch_index
            if pending is not None and self._after_step(*pending):
                pending = None  # rolled back: this step's metrics belong to the abandoned timeline
                continue
            # Once a step, with the stop check: on several hosts it is a collective, and the
            # throughput counts the non-padding tokens of every process's rows.
            stop, tokens = self._stop_requested_and_tokens(int(np.count_nonzero(rows.segment_ids)))
            # Booked one step late, so the host reads metrics while the next step runs.
            pending = (self.step, metrics, self.loader.position, tokens)
            if stop or self._boundary_work_due():
                rolled_back = self._after_step(*pending)
                pending = None
                if rolled_back:
                    continue
                reason = self._boundary_work(stop) or reason
                if reason != "completed":
                    break
        if pending is not None:
            self._after_step(*pending)
        return self._finish(reason)

    def _warn_if_early_stopping_cannot_fire(self) -> None:
        """Patience p stops a run only after p + 1 evaluations; too few steps make it a no-op."""
        patience, every, steps = self.config.early_stopping.patience, self.config.train.eval_every, self.total_steps
        if patience and self.eval_rows is not None:
            evals = steps // every + (1 if steps % every else 0)  # the last step is always evaluated
            if evals <= patience:
                self.log.message(
                    f"warning: early_stopping.patience={patience} cannot stop this run: it evaluates {evals} "
                    f"time(s) (every {every} of {steps} steps) and stopping needs {patience + 1}."
                )

    def _boundary_work_due(self) -> bool:
        t, s = self.config.train, self.step
        return (
            s % t.log_every == 0 or s % t.save_every == 0 or s == self.total_steps
            or (t.eval_every and s % t.eval_every == 0)
        )

    def _stop_requested_and_tokens(self, local_tokens: int) -> tuple[bool, int]:
        """(whether any process must stop, the tokens of the global batch)."""
        local = bool(self.stop_request and self.stop_request.requested) or bool(
            self.should_stop and self.should_stop(self.step))
        return distributed.any_and_sum(local, local_tokens)

    def _boundary_work(self, stop: bool) -> str | None:
        """Logging, evaluation, saving and stopping at a step boundary (metrics flushed)."""
        t, s = self.config.train, self.step
        if s % t.log_every == 0 or s == self.total_steps:
            self._log_interval()
        paused = time.perf_counter()
        # The last step is evaluated before it is saved, so that its checkpoint holds the final eval.
        if self.eval_rows is not None and ((t.eval_every and s % t.eval_every == 0) or s == self.total_steps):
            if self._evaluate():
                if self._interval.state.steps:  # the steps since the last train line end the run here
                    self._interval.exclude(time.perf_counter() - paused)
                    self._log_interval()
                self.ckpt.save(s, self.state, self.loop)
                return "early_stopping"
        if s % t.save_every == 0:
            self.ckpt.save(s, self.state, self.loop, marker=IN_STREAK if self._skipped_in_a_row else None)
        if not stop:  # a signal during the evaluation or the save stops here, not a step later
            stop, _ = self._stop_requested_and_tokens(0)
        if stop:  # the last step's checkpoint is the uninterrupted run's too
            self.ckpt.save(s, self.state, self.loop, marker=AT_STOP if s != self.total_steps else None)
            self.ckpt.wait()
            self.log.message(f"stopped at step {s}; checkpoint saved. Run the same command to continue.")
            return "preempted"
        self._interval.exclude(time.perf_counter() - paused)  # eval and save time is not training time
        return None

    def _after_step(self, step: int, metrics, position, tokens: int) -> bool:
        """Books one step's metrics; True if persistent anomalies rolled the state back.

        `position` is the data position right after that step's batch; `tokens` are the
        non-padding tokens of the global batch.
        """
        m = fetch_metrics(metrics)
        self._skipped_in_a_row = m.consecutive_skipped
        self._interval.add(m, tokens)
        self.log.advance()
        if not m.applied:
            why = "non-finite loss or gradients" if not (math.isfinite(m.loss) and math.isfinite(m.grad_norm)) \
                else f"loss spike ({m.loss:.4g} > {self.config.anomaly.spike_factor} x running median)"
            self.log.message(f"step {step} skipped: {why}")
        if m.consecutive_skipped >= self.config.anomaly.max_consecutive:
            self._persistent_anomaly(step, m.consecutive_skipped, position)
            return True
        return False

    def _persistent_anomaly(self, step: int, count: int, position) -> None:
        """Restores the newest checkpoint from before the bad steps; data continues with the
        batch after them. A checkpoint saved during the streak holds the state that was already
        failing. A second rollback to the same checkpoint stops the run when this streak began
        no later than the last one ended: the run has not got past it (a state that keeps
        failing would otherwise roll back forever). A streak that began after it, on other bad
        data, rolls back again (each such streak ends later, so this ends)."""
        a = self.config.anomaly
        what = f"{count} consecutive steps were skipped as anomalous (last at step {step})"
        self.ckpt.wait()
        # Not a checkpoint a stop saved: the uninterrupted run has none there, and the rollback
        # would go elsewhere than in it (a resumed run must be the same run).
        # (one saved during these bad steps is after their first, so not among them)
        before = [s for s in self.ckpt.rollback_steps() if s <= step - count]
        last_end = self.loop.rolled_back_from
        stuck = bool(before) and before[-1] == self.loop.rolled_back_to and (last_end is None or step - count < last_end)
        if a.on_persistent == "stop" or not before or stuck:
            self.log.close(plot=False)
            if not before:
                raise AnomalyStop(f"{what}; stopping: there is no checkpoint from before them to roll back to yet.")
            if a.on_persistent == "stop":
                raise AnomalyStop(f"{what}; stopping (the last good checkpoint is in {self.ckpt.directory}).")
            raise AnomalyStop(f"{what}; stopping: the last rollback went to step {before[-1]} as well, and the run "
                              f"has not got past the step where the bad steps before it ended "
                              f"({last_end if last_end is not None else 'unknown'}) since "
                              f"(that checkpoint is in {self.ckpt.directory}).")
        self.ckpt.discard_after(before[-1])  # written during the streak: the new timeline saves its own
        self.loader.position = position  # a batch already fetched after the bad ones is used again
        restored_step, state, restored_loop = self.ckpt.restore_latest(self.abstract_state)
        self.state = state.replace(consecutive_skipped=state.consecutive_skipped * 0)  # counting starts afresh
        restored_loop.epoch, restored_loop.batch_index = position.epoch, position.batch_index
        restored_loop.rollbacks = self.loop.rollbacks + 1
        restored_loop.rolled_back_to = restored_step
        restored_loop.rolled_back_from = step
        restored_loop.history = self.log.history  # the log keeps what happened before the rollback
        self.loop, self.step = restored_loop, restored_step
        self._interval = _Interval(self.loop.interval)
        self.log.message(f"{what}; rolled back to step {restored_step}, data continues past the bad batches")
        self.log.start_progress(restored_step)
        self.log.log({"step": step, "event": "rollback", "to_step": restored_step, "skipped_in_a_row": count})

    def _log_interval(self) -> None:
        iv, now = self._interval, time.perf_counter()
        epochs = self.loop.epoch + self.loop.batch_index / self.loader.steps_per_epoch  # as the HF Trainer logs it
        record = {"step": self.step, "epoch": round(epochs, 4), **iv.summary(now)}
        tps = record.get("tokens_per_sec")
        if tps is not None and self.peak:
            record["mfu"] = tps * self.flops_per_token / (self.peak * jax.device_count())
        else:
            record["mfu"] = None
        self.log.log(record)
        self.loop.interval = IntervalState()
        self._interval = _Interval(self.loop.interval, start=now)

    def _evaluate(self) -> bool:
        """Evaluates; saves the best parameters; True when early stopping says stop."""
        result: EvalResult = evaluate(self.eval_step, self.state.params, self.eval_rows,
                                      self.eval_batch // jax.process_count(), self.mesh)
        c = self.config
        value = result.metric(c.checkpoint.metric)
        self.log.log({"step": self.step, **result.record()})
        if self.loop.best.improves(value, self.gib):
            self.ckpt.save_best(self.step, self.state.params, value, result.record())
            self.loop.best.value, self.loop.best.step = value, self.step
        es = self.loop.early_stopping
        es.update(value, self.gib, c.early_stopping.min_delta)
        if es.should_stop(c.early_stopping.patience):
            self.loop.stopped_early = True
            self.log.message(
                f"early stopping at step {self.step}: {c.checkpoint.metric} did not improve by more than "
                f"{c.early_stopping.min_delta} for {es.bad_evals} evaluations (best {es.best:.6g})"
            )
            return True
        return False

    def _finish(self, reason: str) -> RunResult:
        c, s = self.config, self.step
        if reason == "completed":
            evaluated = bool(self.loop.history and self.loop.history[-1].get("eval_loss") is not None
                             and self.loop.history[-1]["step"] == s)
            if self.eval_rows is not None and not evaluated:
                self._evaluate()
            self.ckpt.save(s, self.state, self.loop)
        self.ckpt.wait()
        params = self.state.params
        if c.train.load_best_at_end and self.loop.best.step is not None and reason != "preempted":
            params, meta = self.ckpt.restore_best(self.abstract_state.params)
            self.log.message(f"loaded the best parameters: step {meta['step']}, {meta['metric']} {meta['value']:.6g}")
        self.ckpt.close()
        self.log.close(plot=c.logging.plot and reason != "preempted")
        return RunResult(c.workdir, s, reason, self.loop.history, params, self.loop)


class _Interval:
    """Train metrics between two log lines; skipped steps are counted, never averaged in.

    The metrics live in the checkpointed `IntervalState`; time and tokens are this
    process's own (throughput after a restart is measured afresh).
    """

    def __init__(self, state: IntervalState, start: float | None = None):
        self.state = state
        self.start = start
        self.tokens = 0

    def add(self, m, tokens: int) -> None:
        st = self.state
        st.steps += 1
        st.lr = m.lr
        if m.applied:
            st.losses.append(m.loss)
            st.grad_norms.append(m.grad_norm)
        else:
            st.skipped += 1
        if self.start is None:  # the first step includes compilation: time from its end
            self.start = time.perf_counter()
        else:
            self.tokens += tokens

    def exclude(self, seconds: float) -> None:
        """Time spent on something else (evaluation, saving) inside the interval."""
        if self.start is not None:
            self.start += seconds

    def summary(self, now: float) -> dict:
        st = self.state
        elapsed = now - self.start if self.start is not None else 0.0
        return {
            "loss": float(np.mean(st.losses)) if st.losses else None,
            "lr": st.lr,
            "grad_norm": float(np.mean(st.grad_norms)) if st.grad_norms else None,
            "tokens_per_sec": self.tokens / elapsed if elapsed > 0 and self.tokens else None,
            "skipped": st.skipped,
        }
