"""What a run reports: progress bar, metrics.jsonl, TensorBoard, W&B, curves.png.

Every record is one JSON object in <workdir>/metrics.jsonl. The file, and TensorBoard's
event files, are rewritten from the checkpoint's history on resume, so they always describe
the run that the parameters came from; W&B continues the same run (its id is part of the
checkpointed state). Only process 0 prints and writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from typing import Any

import jax

from jaxtune import distributed
from jaxtune.errors import UserError


def check_wandb_login(config) -> None:
    """W&B's usual failure, no API key on a headless host, found before the data and the
    weights: found when the logger starts, it cost all that work and came after
    `train.overwrite` had deleted the previous run's checkpoints."""
    if not config.logging.wandb:
        return
    problem = None
    if jax.process_index() == 0:  # the only process that logs; every process stops with its error
        try:
            _wandb_login()
        except UserError as e:
            problem = str(e)
    problem = distributed.first_message(problem)
    if problem:
        raise UserError(problem)


def _wandb_login() -> None:
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return  # no login needed
    try:
        import wandb
    except ImportError:
        return  # the logger warns and runs without it
    try:
        wandb.login(verify=False)  # the key from WANDB_API_KEY, ~/.netrc or a prompt; no run is made
    except Exception as e:
        raise _wandb_did_not_start(e) from None


def _wandb_did_not_start(e: Exception) -> UserError:
    why = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return UserError(f"logging.wandb=True but W&B did not start ({why}); run `wandb login`, set "
                     "WANDB_MODE=offline, or set logging.wandb=False.")


TENSORBOARD_FLUSH_SECS = 1


class RunLogger:
    def __init__(self, workdir: str, config, *, total_steps: int, history: list[dict],
                 wandb_id: str | None = None, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = workdir
        self.history = history
        self.bar = None
        self._shown: dict[str, str] = {}  # the progress bar's latest values
        self.tb = None
        self.wandb = None
        if not self.enabled:
            return
        self.path = os.path.join(workdir, "metrics.jsonl")
        with open(self.path, "w") as f:  # exactly the records of the resumed state
            for record in history:
                f.write(json.dumps(record) + "\n")
        self.file = open(self.path, "a", buffering=1)
        lc = config.logging
        if lc.tensorboard:
            from tensorboardX import SummaryWriter

            tb_dir = os.path.join(workdir, "tensorboard")
            shutil.rmtree(tb_dir, ignore_errors=True)  # may hold steps after the restored checkpoint
            # tensorboardX queues events for a thread that writes them and flushes its file at most
            # every flush_secs; SummaryWriter.flush() does not wait for the queue. At the default
            # of 120 s the file lagged a log line behind, and a killed run lost its last ones.
            self.tb = SummaryWriter(tb_dir, flush_secs=TENSORBOARD_FLUSH_SECS)
            for record in history:
                self._tb_scalars(record)
        if lc.wandb:
            try:
                import wandb
            except ImportError:
                print("warning: logging.wandb=True but the wandb package is not installed; "
                      "not logging to W&B (pip install wandb)", file=sys.stderr)
            else:
                try:
                    self.wandb = wandb.init(
                        project=lc.wandb_project, dir=workdir, config=config.to_dict(),
                        name=os.path.basename(os.path.abspath(workdir)), id=wandb_id, resume="allow",
                    )
                except Exception as e:  # wandb's own error types: no login on a headless host, no network, ...
                    self.file.close()  # and TensorBoard's writer thread: the caller gets no logger to close
                    if self.tb is not None:
                        self.tb.close()
                    raise _wandb_did_not_start(e) from None
        self._progress_bar, self._total_steps = lc.progress_bar, total_steps

    def start_progress(self, step: int) -> None:
        """A bar from `step`, started when training starts (started with the logger, its clock
        counted data preparation and compilation: an ETA of minutes for a run of seconds) and
        again after a rollback (counted on from the abandoned steps, it ran past the total)."""
        if not self.enabled or not self._progress_bar:
            return
        from tqdm import tqdm

        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=self._total_steps, initial=step, unit="step", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            self._tb_scalars(record)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if self.bar is not None:
            # merged: an eval line must not wipe the train values from the bar
            self._shown.update({k: f"{record[k]:.4g}" for k in ("loss", "lr", "tokens_per_sec", "eval_loss")
                                if record.get(k) is not None})
            self.bar.set_postfix(self._shown, refresh=False)

    def _tb_scalars(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, record["step"])

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self, plot: bool = True) -> None:
        if not self.enabled or self.file.closed:  # closed already (a stop, then the exception it raised)
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if plot:
            plot_curves(self.history, os.path.join(self.workdir, "curves.png"))


def plot_curves(history: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in history if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), marker="." if len(train) < 2 else None, label="train loss")  # one point: no line
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
