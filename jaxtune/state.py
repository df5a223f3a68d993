"""The training state: a device pytree (`TrainState`) and a host record (`LoopState`).

Both are saved in every checkpoint, so a restart continues exactly: parameters, optimizer
state, the step counters and the anomaly guard's window live on the devices; the data
position, early-stopping and best-model bookkeeping and the metrics so far live on the
host (JSON). Llama has no dropout, so no random state is consumed by a step: data order
is a pure function of (train.seed, epoch), and the data position is the whole of the
run's randomness.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32: batches consumed, applied or skipped
    applied: jax.Array  # int32: updates applied; drives the learning-rate schedule
    params: Any  # pure nnx.State, param_dtype
    opt_state: Any
    loss_window: jax.Array  # [window] float32, NaN where empty: recent applied losses
    skipped: jax.Array  # int32: steps not applied (non-finite or spike), in all
    consecutive_skipped: jax.Array  # int32

    @classmethod
    def create(cls, params, opt_state, window: int) -> "TrainState":
        def zero():  # distinct buffers: the state is donated, and a buffer can be donated once
            return jnp.zeros((), jnp.int32)

        return cls(
            step=zero(), applied=zero(), params=params, opt_state=opt_state,
            loss_window=jnp.full((window,), jnp.nan, jnp.float32), skipped=zero(), consecutive_skipped=zero(),
        )


def resized_window(window: jax.Array, length: int) -> jax.Array:
    """The newest `length` losses of `window`, NaN in front where it has fewer: a run
    resumed with another `anomaly.window` keeps what it knows, and the guard waits as usual
    until the window is full."""
    kept = min(window.shape[0], length)
    return jnp.full((length,), jnp.nan, window.dtype).at[length - kept:].set(window[window.shape[0] - kept:])


@dataclasses.dataclass
class EarlyStoppingState:
    """As transformers' EarlyStoppingCallback: an evaluation resets the patience counter when
    it beats the best value so far by more than `min_delta` (absolute); the best value moves
    on any improvement (as the Trainer's `best_metric` does), small ones included."""

    best: float | None = None
    bad_evals: int = 0

    def update(self, value: float, greater_is_better: bool, min_delta: float) -> None:
        better = self.best is None or (value > self.best if greater_is_better else value < self.best)
        if better and (self.best is None or abs(value - self.best) > min_delta):
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        if better:
            self.best = value

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.bad_evals >= patience


@dataclasses.dataclass
class BestModelState:
    """The best evaluation so far; its parameters are in <workdir>/best."""

    value: float | None = None
    step: int | None = None
    metric: str | None = None  # checkpoint.metric the value is of; None in older checkpoints
    greater_is_better: bool | None = None  # the direction it was chosen by; None in older checkpoints

    def improves(self, value: float, greater_is_better: bool) -> bool:
        if self.value is None:
            return True
        return value > self.value if greater_is_better else value < self.value


@dataclasses.dataclass
class IntervalState:
    """Train metrics since the last log line; checkpointed, so a log line after a restart
    averages the same steps as in an uninterrupted run."""

    losses: list[float] = dataclasses.field(default_factory=list)  # of applied steps
    grad_norms: list[float] = dataclasses.field(default_factory=list)
    steps: int = 0
    skipped: int = 0
    lr: float | None = None


@dataclasses.dataclass
class DataOrder:
    """What fixes the sequence of training batches. A saved data position (epoch, batch)
    means other batches under other values: resuming would silently skip or repeat data."""

    global_batch_size: int
    seed: int
    rows: int  # training rows used per epoch, over all processes
    processes: int | None = None  # each packs and shuffles its own share; unknown in older checkpoints
    # A digest of the training rows' content: other data can pack into as many rows (and a
    # held-out eval record can move into training). None in older checkpoints.
    train_rows: str | None = None

    def changes_from(self, saved: "DataOrder") -> list[str]:
        names = {"global_batch_size": "train.global_batch_size", "seed": "train.seed",
                 "processes": "the number of processes",
                 "rows": "the number of training rows (data or data settings)"}
        if saved.processes is not None and saved.processes != self.processes:
            del names["rows"]  # each process packs its own share: the rows differ with the count alone
        changes = [f"{names[f]} was {getattr(saved, f)}, now {getattr(self, f)}"
                   for f in names if getattr(saved, f) is not None and getattr(saved, f) != getattr(self, f)]
        if "rows" in names and saved.train_rows is not None and saved.train_rows != self.train_rows:
            changes.append("the training rows' content differs (data, tokenizer or data settings)")
        return changes


@dataclasses.dataclass
class LoopState:
    epoch: int = 0  # data-loader position: the next batch is (epoch, batch_index)
    batch_index: int = 0
    early_stopping: EarlyStoppingState = dataclasses.field(default_factory=EarlyStoppingState)
    best: BestModelState = dataclasses.field(default_factory=BestModelState)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # metrics.jsonl records
    rollbacks: int = 0
    rolled_back_to: int | None = None  # the checkpoint step of the last anomaly rollback
    rolled_back_from: int | None = None  # the last skipped step before it (None in older checkpoints)
    stopped_early: bool = False
    interval: IntervalState = dataclasses.field(default_factory=IntervalState)
    wandb_id: str | None = None  # the W&B run this training run logs to, across restarts
    data_order: DataOrder | None = None  # None in checkpoints written before it was recorded
    config: dict[str, Any] | None = None  # the resolved config (config.json) of the start that trained it

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LoopState":
        d = dict(d)
        d["early_stopping"] = EarlyStoppingState(**d.get("early_stopping", {}))
        d["best"] = BestModelState(**d.get("best", {}))
        d["interval"] = IntervalState(**d.get("interval", {}))
        d["data_order"] = DataOrder(**d["data_order"]) if d.get("data_order") else None
        return cls(**d)
