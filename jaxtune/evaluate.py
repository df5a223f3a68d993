"""Evaluation: loss, perplexity and token accuracy over every eval row exactly once."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxtune import distributed
from jaxtune.steps import to_global_batch


@dataclasses.dataclass(frozen=True)
class EvalResult:
    loss: float
    ppl: float
    accuracy: float
    tokens: int

    def record(self) -> dict:
        return {"eval_loss": self.loss, "eval_ppl": self.ppl, "eval_accuracy": self.accuracy,
                "eval_tokens": self.tokens}

    def metric(self, name: str) -> float:
        return {"eval_loss": self.loss, "eval_ppl": self.ppl, "eval_accuracy": self.accuracy}[name]


def evaluate(eval_step, params, rows, local_batch_size: int, mesh) -> EvalResult:
    """Token-weighted over all eval rows; every process runs the same number of batches."""
    from jaxtune.data import iter_eval_batches

    local_batches = -(-len(rows) // local_batch_size)
    num_batches = distributed.global_max(local_batches)
    totals = np.zeros(3, np.float64)  # loss sum, correct, tokens
    for batch in iter_eval_batches(rows, local_batch_size, num_batches):
        totals += np.asarray([float(x) for x in eval_step(params, to_global_batch(batch, mesh, None))])
    loss_sum, correct, tokens = totals
    loss = float(loss_sum / max(tokens, 1.0))
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 700.0)), accuracy=float(correct / max(tokens, 1.0)),
                      tokens=int(tokens))
