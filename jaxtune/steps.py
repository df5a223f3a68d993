"""The compiled train and eval steps: pure `jax.jit` functions over the state pytree with
explicit shardings and a donated state.

Loss normalisation: each micro-batch contributes the *sum* of its token losses and
gradients; the step divides by the number of trained tokens in the whole global batch.
So the result is the same with 1 or N micro-batches, packed or not, on any mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtune import sharding
from jaxtune.losses import fused_loss_sum, loss_and_accuracy_sums
from jaxtune.state import TrainState

BATCH_FIELDS = ("input_ids", "targets", "loss_weights", "positions", "segment_ids")


@struct.dataclass
class Batch:
    """Device-side rows; leaves are [rows, T] (eval) or [accum, rows, T] (train)."""

    input_ids: jax.Array
    targets: jax.Array
    loss_weights: jax.Array
    positions: jax.Array
    segment_ids: jax.Array


@dataclasses.dataclass(frozen=True)
class StepSettings:
    compute_dtype: Any
    loss_chunk_len: int = 0
    spike_factor: float = 0.0  # 0: off


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """What one train step reports, fetched to the host."""

    loss: float
    grad_norm: float
    lr: float
    tokens: float  # trained tokens (loss weights) in the global batch
    applied: bool
    consecutive_skipped: int


def state_shardings(mesh: Mesh, optimizer: optax.GradientTransformation, abstract_state: TrainState):
    params = sharding.tree_shardings(mesh, abstract_state.params)
    rep = sharding.replicated(mesh)
    opt = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_state.opt_state, params,
        transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(
        step=rep, applied=rep, params=params, opt_state=opt, loss_window=rep, skipped=rep, consecutive_skipped=rep,
    )


def abstract_train_state(mesh: Mesh, optimizer: optax.GradientTransformation, abstract_params,
                         window: int) -> tuple[TrainState, TrainState]:
    """The train state as shapes carrying their shardings, and the shardings: enough to
    compile the step (and read its memory) before any weight exists."""
    shapes = jax.eval_shape(lambda p: TrainState.create(p, optimizer.init(p), window), abstract_params)
    shardings = state_shardings(mesh, optimizer, shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings), shardings


def train_batch_sharding(mesh: Mesh) -> Batch:
    s = NamedSharding(mesh, P(None, sharding.BATCH_AXES, None))
    return Batch(*(s,) * len(BATCH_FIELDS))


def eval_batch_sharding(mesh: Mesh) -> Batch:
    s = sharding.batch_sharding(mesh)
    return Batch(*(s,) * len(BATCH_FIELDS))


def abstract_batch(mesh: Mesh, global_rows: int, seq_len: int, accum_steps: int | None) -> Batch:
    """What `to_global_batch` makes of `global_rows` rows, as shapes with shardings (to compile ahead)."""
    if accum_steps is None:
        shape, shardings = (global_rows, seq_len), eval_batch_sharding(mesh)
    else:
        shape, shardings = (accum_steps, global_rows // accum_steps, seq_len), train_batch_sharding(mesh)
    return Batch(*(jax.ShapeDtypeStruct(shape, jnp.float32 if f == "loss_weights" else jnp.int32,
                                        sharding=getattr(shardings, f)) for f in BATCH_FIELDS))


def _loss_sum(graphdef, settings: StepSettings, params, batch: Batch):
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch.input_ids, batch.positions, batch.segment_ids)
    return fused_loss_sum(
        hidden, model.lm_head_kernel(), batch.targets, batch.loss_weights, settings.compute_dtype,
        settings.loss_chunk_len, model.lm_head_is_tied(),
    )


def make_train_step(graphdef, optimizer, schedule: Callable, settings: StepSettings, mesh: Mesh, shardings):
    grad_fn = jax.value_and_grad(lambda p, b: _loss_sum(graphdef, settings, p, b))

    def step(state: TrainState, batch: Batch):
        def micro(carry, mb):
            loss_acc, grad_acc = carry
            loss, grads = grad_fn(state.params, mb)
            grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
            return (loss_acc + loss, grad_acc), None

        if batch.input_ids.shape[0] == 1:  # the common case: no accumulator at all
            loss_sum, grads = grad_fn(state.params, jax.tree.map(lambda x: x[0], batch))
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            # One loop over every micro-batch from zeros (exact: 0 + g is g). Starting the sums
            # with the first micro-batch outside the loop left a one-step loop at 2 micro-batches,
            # which XLA inlined: two forward and backward passes in the program, more memory than
            # the whole batch at once.
            zeros = jax.tree.map(lambda p, sh: jax.lax.with_sharding_constraint(jnp.zeros(p.shape, jnp.float32), sh),
                                 state.params, shardings.params)
            (loss_sum, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros), batch)
        tokens = jnp.sum(batch.loss_weights.astype(jnp.float32))
        denom = jnp.maximum(tokens, 1.0)
        loss = loss_sum / denom
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        grad_norm = optax.tree.norm(grads)

        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if settings.spike_factor > 0:
            window = state.loss_window
            full = jnp.all(~jnp.isnan(window))
            ok &= ~(full & (loss > settings.spike_factor * jnp.nanmedian(window)))

        def update(params_and_opt_state):
            params, opt_state = params_and_opt_state
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A branch, not a select between old and new trees: with the select, XLA kept the
        # old optimizer state alive next to the new one and copied all of it every step.
        params, opt_state = jax.lax.cond(ok, update, lambda po: po, (state.params, state.opt_state))
        new_window = jnp.roll(state.loss_window, -1).at[-1].set(loss)
        new_state = TrainState(
            step=state.step + 1,
            applied=state.applied + ok.astype(jnp.int32),
            params=params,
            opt_state=opt_state,
            loss_window=jnp.where(ok, new_window, state.loss_window),
            skipped=state.skipped + (~ok).astype(jnp.int32),
            consecutive_skipped=jnp.where(ok, 0, state.consecutive_skipped + 1),
        )
        metrics = dict(
            loss=loss, grad_norm=grad_norm, lr=schedule(state.applied), tokens=tokens,
            applied=ok, consecutive_skipped=new_state.consecutive_skipped,
        )
        return new_state, metrics

    rep = sharding.replicated(mesh)
    return jax.jit(
        _traced_on(mesh, step),
        in_shardings=(shardings, train_batch_sharding(mesh)),
        out_shardings=(shardings, rep),
        donate_argnums=(0,),
    )


def make_eval_step(graphdef, settings: StepSettings, mesh: Mesh, param_shardings):
    def step(params, batch: Batch):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(batch.input_ids, batch.positions, batch.segment_ids)
        loss_sum, correct = loss_and_accuracy_sums(
            hidden, model.lm_head_kernel(), batch.targets, batch.loss_weights,
            settings.compute_dtype, settings.loss_chunk_len,
        )
        return loss_sum, correct, jnp.sum(batch.loss_weights.astype(jnp.float32))

    rep = sharding.replicated(mesh)
    return jax.jit(_traced_on(mesh, step), in_shardings=(param_shardings, eval_batch_sharding(mesh)), out_shardings=rep)


def _traced_on(mesh: Mesh, fn):
    """`fn` traced with its activations pinned to `mesh` (see `sharding.constrain`)."""

    @functools.wraps(fn)
    def traced(*args):
        with sharding.activations_on(mesh):
            return fn(*args)

    return traced


def to_global_batch(rows, mesh: Mesh, accum_steps: int | None) -> Batch:
    """Process-local rows -> a global Batch (train: [accum, rows/accum, T])."""
    shardings = eval_batch_sharding(mesh) if accum_steps is None else train_batch_sharding(mesh)
    arrays = []
    for name in BATCH_FIELDS:
        local = np.asarray(getattr(rows, name))
        if accum_steps is None:
            global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        else:
            local = local.reshape(accum_steps, local.shape[0] // accum_steps, *local.shape[1:])
            global_shape = (accum_steps, local.shape[1] * jax.process_count(), *local.shape[2:])
        arrays.append(jax.make_array_from_process_local_data(getattr(shardings, name), local, global_shape))
    return Batch(*arrays)


def fetch_metrics(metrics) -> StepMetrics:
    m = jax.device_get(metrics)
    return StepMetrics(
        loss=float(m["loss"]), grad_norm=float(m["grad_norm"]), lr=float(m["lr"]), tokens=float(m["tokens"]),
        applied=bool(m["applied"]), consecutive_skipped=int(m["consecutive_skipped"]),
    )
