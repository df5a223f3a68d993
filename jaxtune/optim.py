"""AdamW with warmup and decay, as the Hugging Face Trainer means those words.

- `lr(k)` is the learning rate of the k-th applied update (0-based), as HF's LambdaLR:
  warmup rises linearly from 0 (so the first update has lr 0 when warmup > 0), then
  linear or cosine decay towards `min_lr_ratio * lr`, which the update after the last would
  have (as HF's schedules reach 0 there: the last update's lr is one decay step above it),
  or constant.
- `warmup_steps > 0` overrides `warmup_ratio`; the ratio gives `ceil(ratio * total)`.
- Decoupled weight decay (`p -= lr * wd * p`, torch.optim.AdamW) on every parameter but
  norm weights and biases (HF's default grouping; embeddings are decayed).
- Clipping by global norm before AdamW, like `clip_grad_norm_` in the Trainer.
Gradient accumulation is not here: the train step sums micro-batch gradients and divides
by the global number of trained tokens, which optax.MultiSteps' averaging would not do.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    lr: float = 2e-5
    schedule: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    @classmethod
    def from_config(cls, c) -> "OptimizerSettings":
        return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls)})


def num_warmup_steps(s: OptimizerSettings, total_steps: int) -> int:
    return s.warmup_steps if s.warmup_steps > 0 else math.ceil(total_steps * s.warmup_ratio)


def lr_schedule(s: OptimizerSettings, total_steps: int) -> optax.Schedule:
    warmup = num_warmup_steps(s, total_steps)
    decay_steps = max(1, total_steps - warmup)

    def schedule(step):
        # The decay is written in the steps left (counted in integers), not as 1 - progress:
        # in float32 that difference loses the last steps' rates of a long run (cosine's
        # last ~15 of 200k were 0).
        step = jnp.asarray(step)
        left = jnp.clip((warmup + decay_steps - step).astype(jnp.float32) / decay_steps, 0.0, 1.0)
        if s.schedule == "linear":
            decay = left
        elif s.schedule == "cosine":
            decay = jnp.sin(0.5 * jnp.pi * left) ** 2  # = (1 + cos(pi * progress)) / 2
        else:
            decay = jnp.ones_like(left)
        decayed = s.min_lr_ratio + (1.0 - s.min_lr_ratio) * decay
        warm = step.astype(jnp.float32) / max(1, warmup)
        return s.lr * jnp.where(step < warmup, warm, decayed)

    return schedule


def decay_mask(params):
    """True for parameters that get weight decay: not norm weights, not biases."""

    def decays(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return not (names[-1] == "bias" or any("norm" in n for n in names))

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(s: OptimizerSettings, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(
        lr_schedule(s, total_steps), b1=s.b1, b2=s.b2, eps=s.eps,
        weight_decay=s.weight_decay, mask=decay_mask,
    )
    if s.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(s.max_grad_norm), adamw)
    return adamw
