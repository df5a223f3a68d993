"""Orbax checkpoints: the latest-k full training states and the best-k parameter sets.

<workdir>/checkpoints/<step>/{state,loop}  TrainState (sharded arrays) + LoopState (JSON)
<workdir>/best/<step>/{params,meta}       parameters only, with the step and metric value

Saves are asynchronous: `save` returns once the arrays are copied off the devices, and
Orbax writes into `<step>.orbax-checkpoint-tmp` which is renamed when complete, so a
process killed mid-save leaves only a temporary directory, which is never restored and
is removed at the next start. Deletion is atomic the same way: a step directory is
renamed into `.deleted/` and removed from there, so a process killed mid-deletion never
leaves a half-deleted step that looks like a checkpoint. Restores always pass explicit
abstract targets that carry the shardings of the current mesh, so a run resumes on
another mesh or device count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import threading
import time

import jax
import orbax.checkpoint as ocp

from jaxtune import distributed
from jaxtune.errors import UserError
from jaxtune.state import LoopState, TrainState, resized_window

TMP_MARKER = ".orbax-checkpoint-tmp"
TRASH = ".deleted"  # Orbax renames a step here to delete it (todelete_subdir)
# Items that mark a checkpoint saved off the save schedule, not counted by `checkpoint.keep`.
AT_STOP = "at_stop"  # saved because the run was stopped: never a rollback's target either
IN_STREAK = "in_streak"  # saved during skipped steps


@dataclasses.dataclass
class _KeepScheduled:
    """An Orbax preservation policy: `checkpoint.keep` counts the checkpoints of the save
    schedule. One saved off it stays only while it is the newest:
    - saved because the run was stopped (a preemption): kept longer, it would push a
      scheduled one out, and which checkpoint a later rollback returns to would differ from
      the uninterrupted run's;
    - saved during skipped steps: counted, it pushed out the checkpoint a rollback past
      those steps needs (with keep=1 the only one, and the run stopped instead). It may still
      be a later rollback's target once those steps were followed by good ones (skipped
      steps change no weight)."""

    directory: str
    keep: int
    pending: dict[int, str] = dataclasses.field(default_factory=dict)  # step -> marker, being written

    def marked(self, step: int, marker: str) -> bool:
        return self.pending.get(step) == marker or os.path.isdir(os.path.join(self.directory, str(step), marker))

    def counted(self, step: int) -> bool:
        return not (self.marked(step, AT_STOP) or self.marked(step, IN_STREAK))

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        steps = [c.step for c in checkpoints]
        scheduled = sorted(s for s in steps if self.counted(s))
        kept = set(scheduled[-self.keep:]) | {max(steps, default=-1)}
        return [s in kept for s in steps]


def _manager(directory, items, *, max_to_keep=None, preservation_policy=None, best_fn=None, best_mode="min"):
    """`items` maps each item name to its handler (so metadata can be read before a restore).

    Each manager gets its own barrier prefix: Orbax names its multi-process barriers after the
    step directory ("async_write_complete.20"), so without one the saves of `checkpoints/20`
    and `best/20`, which finish in two background threads at the same time, met at the same
    barrier ("Barrier _async_write_complete.20 is already ongoing") and the job hung.
    """
    _remove_incomplete(directory)
    options = ocp.CheckpointManagerOptions(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=os.path.basename(directory)),
        max_to_keep=max_to_keep,
        preservation_policy=preservation_policy,
        best_fn=best_fn,
        best_mode=best_mode,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
        todelete_subdir=TRASH,
        create=True,
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=items)


def _remove_incomplete(directory):
    """Deletes what a killed save or deletion left behind (Orbax also removes temporary
    directories; this covers every layout)."""
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if TMP_MARKER in name or name.startswith(TRASH):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _empty_trash(directory, removals: list[threading.Thread]) -> None:
    """Removes the steps Orbax has renamed into the trash, in a thread appended to
    `removals`. The trash is first renamed aside whole, so Orbax can keep renaming steps
    into a fresh one; what a process killed first leaves there goes at the next start."""
    trash = os.path.join(directory, TRASH)
    if jax.process_index() != 0 or not os.path.isdir(trash):
        return
    aside = f"{trash}-{time.monotonic_ns()}"
    os.replace(trash, aside)
    removals.append(threading.Thread(target=shutil.rmtree, args=(aside,), kwargs={"ignore_errors": True}))
    removals[-1].start()


_SETTINGS_BEHIND = {  # the first field of a TrainState path -> the settings that shape it
    "params": " (model.hf_path or model.param_dtype changed?)",
    "opt_state": " (an optimizer setting changed? e.g. optimizer.max_grad_norm 0 vs > 0)",
}


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _shapes(tree) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    """{path: (shape, dtype)} of a tree of arrays, abstract arrays or Orbax array metadata."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(_key_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in flat}


def _describe(shape_dtype) -> str:
    shape, dtype = shape_dtype
    return f"{dtype}{list(shape)}"


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, keep_best: int, metric: str, greater_is_better: bool,
                 on_corrupt: str = "error"):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.best_directory = os.path.abspath(os.path.join(workdir, "best"))
        self.metric = metric
        self.on_corrupt = on_corrupt
        self._removals: list[threading.Thread] = []  # emptying the trash while training goes on
        self.retention = _KeepScheduled(self.directory, keep)
        self.manager = _manager(
            self.directory,
            {"state": ocp.StandardCheckpointHandler(), "loop": ocp.JsonCheckpointHandler(),
             AT_STOP: ocp.JsonCheckpointHandler(), IN_STREAK: ocp.JsonCheckpointHandler()},
            preservation_policy=self.retention,
        )
        self.best_manager = _manager(
            self.best_directory,
            {"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
            max_to_keep=keep_best, best_fn=lambda m: m[metric], best_mode="max" if greater_is_better else "min",
        )

    # ---- full training state ------------------------------------------------------------
    def save(self, step: int, state: TrainState, loop: LoopState, *, marker: str | None = None) -> None:
        """`marker`: AT_STOP or IN_STREAK for a checkpoint off the save schedule (see `_KeepScheduled`)."""
        if step in self.manager.all_steps():
            if marker is not None or self.retention.counted(step):
                return  # this step is saved already, as it would be now or on the schedule
            # An off-schedule checkpoint of this step, now the run's last one (e.g. the run was
            # resumed with train.max_steps at its stop): replaced, so that it holds the final
            # evaluation and counts. The older checkpoints stay until the new one is complete.
            self.manager.wait_until_finished()
            self.manager.delete(step)
            self.retention.pending.pop(step, None)
        self._finish_deletions(self.manager, self.directory)
        items = {"state": ocp.args.StandardSave(state), "loop": ocp.args.JsonSave(loop.to_json())}
        if marker is not None:
            self.retention.pending[step] = marker
            items[marker] = ocp.args.JsonSave({"step": step})
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _finish_deletions(self, manager, directory) -> None:
        """Waits for `manager`'s previous save (Orbax's own save would), whose completion
        deletes the checkpoints it replaces, and removes what it deleted, in the background."""
        manager.wait_until_finished()
        _empty_trash(directory, self._removals)
        self._removals = [t for t in self._removals if t.is_alive()]

    def rollback_steps(self) -> list[int]:
        """The checkpoints a rollback may return to, which an uninterrupted run has too: not
        one saved because the run was stopped."""
        return [s for s in self.steps() if not self.retention.marked(s, AT_STOP)]

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, LoopState]:
        """The state at `step` in `abstract_state`'s shardings. The anomaly guard's window is
        read at its saved length and resized (`resized_window`): `anomaly.window` may change
        between starts."""
        wanted = getattr(abstract_state, "loss_window", None)  # any tree can be saved; a TrainState has it
        target = abstract_state
        saved_length = None if wanted is None else self._saved_window_length(step)
        if saved_length is not None and saved_length != wanted.shape[0]:
            target = abstract_state.replace(
                loss_window=jax.ShapeDtypeStruct((saved_length,), wanted.dtype, sharding=wanted.sharding))
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), loop=ocp.args.JsonRestore()),
        )
        state = restored.state
        if wanted is not None and state.loss_window.shape != wanted.shape:
            resize = jax.jit(resized_window, static_argnums=1, out_shardings=wanted.sharding)
            state = state.replace(loss_window=resize(state.loss_window, wanted.shape[0]))
        return state, LoopState.from_json(restored.loop)

    def _saved_shapes(self, step: int) -> dict | None:
        """`_shapes` of the state saved at `step`; None if its metadata cannot be read."""
        try:
            return _shapes(self.manager.item_metadata(step)["state"])
        except Exception:  # noqa: BLE001 - unreadable metadata: left to the restore's corruption handling
            return None

    def _saved_window_length(self, step: int) -> int | None:
        shape_dtype = (self._saved_shapes(step) or {}).get(("loss_window",))
        return None if shape_dtype is None else shape_dtype[0][0]

    def restore_latest(self, abstract_state: TrainState, log=print):
        """(step, state, loop) of the newest readable checkpoint, or None if there is none.

        `best/` is made to agree with the restored best-model state (`_reconcile_best`). A
        checkpoint whose arrays do not have
        the shapes this config makes is a config change, not corruption: that is an error
        whatever `on_corrupt` says, and the checkpoint is left as it is.
        """
        set_aside = False
        for step in reversed(self.steps()):
            where = os.path.join(self.directory, str(step))
            change = self._config_change(step, abstract_state)
            if change:
                raise UserError(
                    f"checkpoint {where} was written with another configuration: {change}. Resume with the "
                    "settings it was written with, or use a new workdir (or train.resume=never with "
                    "train.overwrite=True)."
                )
            try:
                with _quiet_abandoned_reads(where):
                    state, loop = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any unreadable file means a corrupt checkpoint
                if self.on_corrupt != "fallback":
                    raise UserError(
                        f"checkpoint {where} is corrupted or unreadable ({_root_cause(e)}); "
                        "delete it or set checkpoint.on_corrupt=fallback to resume from the one before."
                    ) from None
                self._set_aside(step)
                set_aside = True
                log(f"warning: checkpoint {where} is unreadable ({_root_cause(e)}); moved it to "
                    f"{where}.corrupt and trying the previous one")
                continue
            self._reconcile_best(step, state, loop, log)
            return step, state, loop
        if set_aside:  # starting over would replace what the run has (its best model, its metrics)
            raise UserError(no_checkpoint_left(self.directory, corrupt_steps(self.directory)))
        return None

    def _reconcile_best(self, step: int, state: TrainState, loop: LoopState, log) -> None:
        """Best-model checkpoints written after `step` belong to a timeline that is replayed
        (or, after an anomaly rollback, abandoned) from here, so they are removed, unless the
        restored best's own files are gone:

        - `keep_best` deleted it when a later, better evaluation arrived: those later
          parameters were evaluated, so they are kept and become the best so far; removing
          them would leave no best model at all;
        - it is this step's own best model, whose save had not completed when the process
          died (the two managers write independently): it is saved again from the restored
          parameters, which are that model.
        """
        self.best_manager.wait_until_finished()
        on_disk = self.best_manager.all_steps()
        later = [s for s in on_disk if s > step]
        if loop.best.step is None or loop.best.step in on_disk:
            self.discard_best_after(step)
        elif later:  # they beat the restored best, so they beat anything older on disk too
            best = self.best_step()
            value = float(self._best_meta(best)["value"])
            log(f"the best model of step {loop.best.step} was replaced by later ones; keeping best/{best} "
                f"({self.metric} {value:.6g}) as the best so far")
            loop.best.value, loop.best.step = value, best
        elif loop.best.step == step:
            record = next((r for r in reversed(loop.history) if r.get("step") == step and self.metric in r), {})
            self.save_best(step, state.params, loop.best.value, {k: v for k, v in record.items() if k != "step"})
            self.best_manager.wait_until_finished()
            log(f"the best model of step {step} was not completely saved; saved it again from checkpoint {step}")

    def _best_meta(self, step: int) -> dict:
        return self.best_manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def _config_change(self, step: int, abstract_state: TrainState) -> str | None:
        """What differs between the arrays saved at `step` and `abstract_state`, in words;
        None when they agree or the metadata cannot be read (then the restore will tell)."""
        saved = self._saved_shapes(step)
        if saved is None:
            return None
        expected = _shapes(abstract_state)
        if ("loss_window",) in saved and ("loss_window",) in expected:  # any length resumes (`restore`)
            del saved[("loss_window",)], expected[("loss_window",)]
        if not saved or saved == expected:
            return None
        # Parameters first: they shape the optimizer state too, whose hint would mislead.
        for path in sorted(set(saved) | set(expected), key=lambda path: (path[0] != "params", path)):
            if saved.get(path) != expected.get(path):
                name = ".".join(path)
                hint = _SETTINGS_BEHIND.get(path[0], "")
                if path not in saved or path not in expected:
                    there = "is not in the checkpoint" if path not in saved else "is in the checkpoint only"
                    return f"{name} {there}{hint}"
                return f"{name} is {_describe(saved[path])} there and {_describe(expected[path])} here{hint}"
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            where = os.path.join(self.directory, str(step))
            os.replace(where, f"{where}.corrupt")
        distributed.barrier(f"checkpoint {step} set aside")  # before any process lists the steps again
        self.manager.reload()

    def discard_after(self, step: int) -> None:
        """Removes training checkpoints after `step` (a timeline an anomaly rollback abandons)."""
        self.manager.wait_until_finished()
        for later in [s for s in self.manager.all_steps() if s > step]:
            self.manager.delete(later)
            self.retention.pending.pop(later, None)
        _empty_trash(self.directory, self._removals)

    def discard_best_after(self, step: int) -> None:
        """Removes best-model checkpoints after `step` (all of them for -1: a fresh start)."""
        self.best_manager.wait_until_finished()
        for later in [s for s in self.best_manager.all_steps() if s > step]:
            self.best_manager.delete(later)
        _empty_trash(self.best_directory, self._removals)

    # ---- best parameters ------------------------------------------------------------------
    def save_best(self, step: int, params, value: float, metrics: dict) -> None:
        meta = {"step": step, "metric": self.metric, "value": value, "metrics": metrics}
        self._finish_deletions(self.best_manager, self.best_directory)
        if step in self.best_manager.all_steps():  # a better evaluation of the same step, after a rollback
            self.best_manager.delete(step)
        self.best_manager.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)),
            metrics={self.metric: value},
            force=True,
        )

    def best_step(self) -> int | None:
        return self.best_manager.best_step()

    def restore_best(self, abstract_params, step: int | None = None):
        """(params, meta) of the best checkpoint (or of `step`)."""
        self.best_manager.wait_until_finished()
        step = self.best_step() if step is None else step
        if step is None:
            raise UserError(f"no best checkpoint in {self.best_directory}.")
        restored = self.best_manager.restore(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()),
        )
        return restored.params, restored.meta

    def wait(self) -> None:
        self._finish_deletions(self.manager, self.directory)
        self._finish_deletions(self.best_manager, self.best_directory)

    def close(self) -> None:
        """Also ends every removal from the trash: a finished run leaves no deleted checkpoint
        on disk for a next start to remove."""
        self.wait()
        for removal in self._removals:
            removal.join()
        self._removals = []
        self.manager.close()
        self.best_manager.close()


def corrupt_steps(directory: str) -> list[str]:
    """The checkpoints `checkpoint.on_corrupt=fallback` set aside in `directory`."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted((n for n in names if n.endswith(".corrupt")), key=lambda n: (len(n), n))  # 8 before 12


def no_checkpoint_left(directory: str, set_aside: list[str]) -> str:
    return (f"no readable checkpoint is left in {directory} (set aside as unreadable: {', '.join(set_aside)}), and "
            "starting over would replace this run's best model and metrics; use train.resume=never with "
            "train.overwrite=True to start over, or another workdir.")


def _root_cause(error: BaseException, limit: int = 300) -> str:
    """The innermost error's first line: TensorStore's reason ("Requested byte range ... is not
    valid for value of size 100"), not Orbax's wrapper, whose text is a repr of the whole spec.
    A context hidden by `raise ... from None` stays hidden (json's decode error hides a
    StopIteration)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            break
        error = inner
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:limit]}" if first else type(error).__name__


# Checkpoint step directories being restored (None) or whose restore failed (when): a failed
# restore's stray reads are local or network file reads, done well within this many seconds.
_restored_dirs: dict[str, float | None] = {}
_ECHO_SECONDS = 60.0


def _is_abandoned_read(error: BaseException | None, obj=None) -> bool:
    """An error of a read that a failed restore left behind: about a file of a checkpoint
    whose restore failed (TensorStore's futures, Orbax's read tasks), a read coroutine of
    Orbax's dropped unfinished, or the closed event loop such reads report back to. Nothing
    is taken for one unless a restore is in progress or failed less than a minute ago."""
    now = time.monotonic()
    active = [d for d, failed in _restored_dirs.items() if failed is None or now - failed < _ECHO_SECONDS]
    if not active:
        return False
    code = getattr(obj, "cr_code", None)
    return (
        (isinstance(error, RuntimeError) and str(error) == "Event loop is closed")
        or (error is not None and any(d in str(error) for d in active))
        or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename)
    )


class _AbandonedReadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # asyncio's "... exception was never retrieved"
        error = record.exc_info[1] if record.exc_info else None
        return not ("never retrieved" in record.getMessage() and _is_abandoned_read(error))


_hooks_installed = False


@contextlib.contextmanager
def _quiet_abandoned_reads(step_dir: str):
    """Around a restore of `step_dir`. A failed restore leaves Orbax's other reads in flight
    (its gather stops at the first error and closes the event loop); as they finish they
    printed tracebacks ("Event loop is closed", "Future exception was never retrieved", a
    never-awaited read coroutine), dozens of them around the one-line report of the same
    failure. During the restore (the echoes start while its error unwinds) and for a minute
    after it failed, those echoes are dropped; everything else still reaches Python's hooks,
    and after a successful restore nothing is filtered."""
    global _hooks_installed
    key = step_dir + os.sep
    _restored_dirs[key] = None
    if not _hooks_installed:
        _hooks_installed = True
        previous = sys.unraisablehook

        def hook(unraisable):
            if not _is_abandoned_read(unraisable.exc_value, unraisable.object):
                previous(unraisable)

        sys.unraisablehook = hook
        logging.getLogger("asyncio").addFilter(_AbandonedReadFilter())
    try:
        yield
    except BaseException:
        _restored_dirs[key] = time.monotonic()  # its stray reads finish soon after
        raise
    del _restored_dirs[key]  # read in full: nothing of it is left in flight
