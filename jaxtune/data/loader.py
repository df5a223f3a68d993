"""Batches of rows: shuffled by index per epoch, resumable from a saved position.

The order of epoch e is a permutation drawn from (seed, e) alone, so a loader rebuilt at a
saved `LoaderPosition` yields exactly the batches an uninterrupted one would have, with no
re-reading or skipping.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from jaxtune.data.rows import Rows
from jaxtune.errors import UserError


@dataclasses.dataclass(frozen=True)
class LoaderPosition:
    epoch: int = 0
    batch_index: int = 0  # batches already consumed in this epoch


def epoch_order(num_rows: int, usable_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The rows of an epoch, in order: the first `usable_rows` of a permutation of all rows,
    so over several epochs every row is used even when `usable_rows < num_rows`."""
    rng = np.random.default_rng([seed % 2**63, epoch])
    return rng.permutation(num_rows)[:usable_rows]


def too_few_rows(rows: int, global_batch_size: int, process_count: int, packing: bool) -> str:
    """The sentence for training data that fills no batch, in the settings' words.

    `rows`: the fewest any process has (each process takes its share of one batch)."""
    packed = " after packing" if packing else ""
    if process_count > 1:
        where = f" on the process with the fewest of the {process_count}"
        batch = f"{global_batch_size // process_count} rows (train.global_batch_size={global_batch_size} over " \
                f"{process_count} processes)"
    else:
        where, batch = "", f"train.global_batch_size={global_batch_size} rows"
    hint = "add data or lower train.global_batch_size"
    if packing:
        hint = "add data, lower train.global_batch_size, or turn off data.packing (it joins examples into fewer rows)"
    return f"the training data has {rows:,} row{'' if rows == 1 else 's'}{packed}{where}, fewer than one batch of " \
           f"{batch}; {hint}."


class BatchLoader:
    """Rows for this process, `batch_size` at a time; the last partial batch of an epoch is dropped."""

    def __init__(
        self,
        rows: Rows,
        batch_size: int,
        seed: int,
        position: LoaderPosition = LoaderPosition(),
        usable_rows: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        usable = len(rows) if usable_rows is None else usable_rows
        if not 0 <= usable <= len(rows):
            raise ValueError(f"usable_rows {usable_rows} is not in [0, {len(rows)}]")
        if usable < batch_size:  # training checks first, with the words of its settings
            raise UserError(f"the data has {usable:,} rows, fewer than one batch of {batch_size} rows.")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.usable_rows = usable
        self.steps_per_epoch = usable // batch_size
        self._order_epoch = -1
        self._order = np.empty(0, np.int64)
        self.position = position

    @property
    def position(self) -> LoaderPosition:
        """The position of the next batch; part of the training state."""
        return self._position

    @position.setter
    def position(self, position: LoaderPosition) -> None:
        """Resumes at a saved position (checked: a position past the end of an epoch means the
        data or the batch size changed since it was saved)."""
        if position.epoch < 0 or not 0 <= position.batch_index < self.steps_per_epoch:
            raise UserError(
                f"the saved data position (epoch {position.epoch}, batch {position.batch_index}) does not fit this "
                f"data ({self.steps_per_epoch} batches per epoch); the data or batch size changed since it was saved."
            )
        self._position = position

    def next_batch(self) -> Rows:
        epoch, index = self.position.epoch, self.position.batch_index
        if self._order_epoch != epoch:
            self._order = epoch_order(len(self.rows), self.usable_rows, self.seed, epoch)
            self._order_epoch = epoch
        batch = self.rows[self._order[index * self.batch_size:(index + 1) * self.batch_size]]
        index += 1
        self._position = LoaderPosition(epoch + 1, 0) if index == self.steps_per_epoch else LoaderPosition(epoch, index)
        return batch


def iter_eval_batches(rows: Rows, batch_size: int, num_batches: int | None = None) -> Iterator[Rows]:
    """Every row exactly once, in order; the last batch is padded, and with `num_batches`
    (the most any process has) all-padding batches follow, so every process runs as many steps."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    needed = -(-len(rows) // batch_size)
    if num_batches is not None and num_batches < needed:
        raise ValueError(f"num_batches {num_batches} < {needed} batches needed for {len(rows)} rows")
    for b in range(needed if num_batches is None else num_batches):
        batch = rows[b * batch_size:(b + 1) * batch_size]
        if len(batch) < batch_size:
            batch = Rows.concatenate([batch, Rows.padding(batch_size - len(batch), rows.seq_len)])
        yield batch
