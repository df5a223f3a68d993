"""Fixed-length training rows: what the model and the loss read."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

FIELDS = ("input_ids", "targets", "loss_weights", "positions", "segment_ids")


@dataclasses.dataclass(eq=False)  # arrays: compare with .equals()
class Rows:
    """Rows of `T = max_seq_len` tokens, all arrays `[N, T]`.

    `targets[t]` is the next token of the same segment and `loss_weights[t]` is 1.0 where
    that token is trained; `positions` restart at 0 for each packed sample and
    `segment_ids` are 1, 2, ... per sample (0 for padding), so attention and RoPE see each
    sample as if it were alone.
    """

    input_ids: np.ndarray  # int32
    targets: np.ndarray  # int32
    loss_weights: np.ndarray  # float32
    positions: np.ndarray  # int32
    segment_ids: np.ndarray  # int32

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, idx) -> "Rows":
        """Rows by numpy indexing (slice, index array, mask); an integer gives one row, still 2-D."""
        if isinstance(idx, (int, np.integer)):
            idx = slice(int(idx), int(idx) + 1) if idx != -1 else slice(-1, None)
        return Rows(*(getattr(self, f)[idx] for f in FIELDS))

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_trained_tokens(self) -> int:
        return int(np.count_nonzero(self.loss_weights))

    @property
    def num_tokens(self) -> int:
        """Tokens that are not padding."""
        return int(np.count_nonzero(self.segment_ids))

    @staticmethod
    def padding(n: int, seq_len: int) -> "Rows":
        """`n` rows of padding: segment 0, nothing trained."""
        zeros = np.zeros((n, seq_len), np.int32)
        return Rows(zeros, zeros.copy(), np.zeros((n, seq_len), np.float32), zeros.copy(), zeros.copy())

    @staticmethod
    def concatenate(parts: list["Rows"]) -> "Rows":
        return Rows(*(np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS))

    def fingerprint(self) -> bytes:
        """A digest of the rows' content (targets and positions follow from the rest): the
        same rows give the same digest wherever the files were copied to. ~1 s per 100M tokens."""
        h = hashlib.sha256(repr(self.input_ids.shape).encode())
        for f in ("input_ids", "loss_weights", "segment_ids"):
            h.update(memoryview(np.ascontiguousarray(getattr(self, f))).cast("B"))
        return h.digest()

    def equals(self, other: "Rows") -> bool:
        return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in FIELDS)
