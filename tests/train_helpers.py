"""Build a sharded train step for a tiny checkpoint, and synthetic rows, for step-level tests."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune import sharding
from jaxtune.models.hf_io import abstract_model, load_params
from jaxtune.models.llama import LlamaConfig
from jaxtune.optim import OptimizerSettings, build_optimizer, lr_schedule
from jaxtune.state import TrainState
from jaxtune.steps import StepSettings, abstract_train_state, make_eval_step, make_train_step, to_global_batch


def synthetic_rows(n, seq_len, vocab=128, seed=0, weight_prob=0.7):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (n, seq_len)).astype(np.int32)
    weights = (rng.rand(n, seq_len) < weight_prob).astype(np.float32)
    weights[:, -1] = 0.0
    return types.SimpleNamespace(
        input_ids=ids,
        targets=np.roll(ids, -1, axis=1),
        loss_weights=weights,
        positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy(),
        segment_ids=np.ones((n, seq_len), np.int32),
    )


def slice_rows(rows, idx):
    return types.SimpleNamespace(**{k: v[idx] for k, v in vars(rows).items()})


class Trainer:
    """The pieces `jaxtune.train` assembles, on a given mesh."""

    def __init__(self, path, mesh_shape=sharding.MeshShape(1, 1, 1), *, total_steps=10, accum=1,
                 remat="none", compute_dtype="float32", opt=None, spike_factor=0.0, window=4, chunk=0,
                 devices=None):
        self.config = LlamaConfig.from_pretrained(path)
        devices = devices if devices is not None else jax.devices()[: abs(np.prod(
            [s for s in (mesh_shape.data, mesh_shape.fsdp, mesh_shape.tensor)]))]
        self.mesh = sharding.make_mesh(mesh_shape, devices=devices)
        self.graphdef, abstract = abstract_model(self.config, compute_dtype=compute_dtype, remat=remat)
        params_abstract = nnx.as_pure(abstract)
        settings = opt or OptimizerSettings(lr=1e-2, warmup_steps=2, weight_decay=0.1)
        self.optimizer = build_optimizer(settings, total_steps)
        self.schedule = lr_schedule(settings, total_steps)
        self.abstract_state, self.shardings = abstract_train_state(self.mesh, self.optimizer, params_abstract, window)
        params = load_params(path, params_abstract, self.config, sharding.param_sharding_fn(self.mesh))
        self.state = jax.jit(
            lambda p: TrainState.create(p, self.optimizer.init(p), window),
            in_shardings=(self.shardings.params,), out_shardings=self.shardings,
        )(params)
        self.step_settings = StepSettings(jnp.dtype(compute_dtype), chunk, spike_factor)
        self.accum = accum
        self.train_step = make_train_step(self.graphdef, self.optimizer, self.schedule, self.step_settings,
                                          self.mesh, self.shardings)
        self.eval_step = make_eval_step(self.graphdef, self.step_settings, self.mesh, self.shardings.params)

    def step(self, rows):
        self.state, metrics = self.train_step(self.state, to_global_batch(rows, self.mesh, self.accum))
        return jax.device_get(metrics)

    def lowered(self, rows):
        """The train step lowered for `rows` (`.as_text()`, or `.compile()` for XLA's program)."""
        return self.train_step.lower(self.state, to_global_batch(rows, self.mesh, self.accum))

    def params(self):
        return jax.device_get(self.state.params)
