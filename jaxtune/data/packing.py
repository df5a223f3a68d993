"""Samples -> fixed-length rows, packed (best-fit decreasing) or one sample per row.

No sample is split across rows (samples longer than a row were truncated or dropped
before). Targets are shifted within each segment, so no token learns to predict the
first token of the next sample.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np

from jaxtune.data.rows import Rows
from jaxtune.data.tokenize import TokenizedSample


def best_fit_decreasing(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Sample indices per row: longest first, each into the fullest row it still fits.
    Deterministic: ties keep the input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (remaining capacity, row), sorted
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise ValueError(f"sample {i} has {n} tokens, more than a row of {seq_len}")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            remaining, row = free.pop(j)
        else:
            remaining, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (remaining - n, row))
    return rows


def pack(samples: Sequence[TokenizedSample], seq_len: int, packing: bool) -> Rows:
    lengths = [len(s.ids) for s in samples]
    layout = best_fit_decreasing(lengths, seq_len) if packing else [[i] for i in range(len(samples))]
    if not samples:
        return Rows.padding(0, seq_len)
    order = np.array([i for row in layout for i in row], np.int64)
    row_of = np.repeat(np.arange(len(layout)), [len(r) for r in layout])
    segment = np.concatenate([np.arange(1, len(r) + 1) for r in layout])
    length = np.asarray(lengths, np.int64)[order]
    # Offset of each sample in its row: the lengths of the samples before it in the same row.
    starts = np.cumsum(length) - length
    row_start = starts[np.searchsorted(row_of, row_of)]  # the first sample of the same row
    offset = starts - row_start

    ids = np.concatenate([samples[i].ids for i in order]).astype(np.int32)
    mask = np.concatenate([samples[i].mask for i in order])
    sample_of = np.repeat(np.arange(len(order)), length)
    within = np.arange(len(ids)) - np.repeat(starts, length)
    flat = row_of[sample_of] * seq_len + offset[sample_of] + within
    last = within == length[sample_of] - 1

    targets = np.zeros_like(ids)
    targets[:-1] = ids[1:]
    targets[last] = 0
    weights = np.zeros(len(ids), np.float32)
    weights[:-1] = mask[1:]
    weights[last] = 0.0

    out = Rows.padding(len(layout), seq_len)
    out.input_ids.flat[flat] = ids
    out.targets.flat[flat] = targets
    out.loss_weights.flat[flat] = weights
    out.positions.flat[flat] = within
    out.segment_ids.flat[flat] = segment[sample_of]
    return out
