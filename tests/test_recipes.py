"""The shipped recipes fit the hardware they are written for, by XLA's compiled memory of
their train step (compiled from shapes alone: no weight is made)."""

import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune import sharding
from jaxtune.config import parse_args
from jaxtune.models.hf_io import abstract_model
from jaxtune.models.llama import LlamaConfig
from jaxtune.optim import OptimizerSettings, build_optimizer, lr_schedule
from jaxtune.steps import StepSettings, abstract_batch, abstract_train_state, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LLAMA_31_8B = {  # Meta-Llama-3.1-8B-Instruct/config.json, the fields that size the model
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}


def compiled_bytes_per_device(config, model_config: LlamaConfig) -> int:
    """Weights, optimizer state, the step's temporaries and its outputs that do not reuse
    a donated buffer (the metrics: the new state is written over the old), on one device."""
    mesh = sharding.make_mesh(sharding.MeshShape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
    graphdef, abstract = abstract_model(model_config, param_dtype=config.model.param_dtype,
                                        compute_dtype=config.model.compute_dtype, remat=config.model.remat)
    settings = OptimizerSettings.from_config(config.optimizer)
    optimizer = build_optimizer(settings, 1000)
    state, shardings = abstract_train_state(mesh, optimizer, nnx.as_pure(abstract), config.anomaly.window)
    step_settings = StepSettings(jnp.dtype(config.model.compute_dtype), config.model.loss_chunk_len,
                                 config.anomaly.spike_factor)
    step = make_train_step(graphdef, optimizer, lr_schedule(settings, 1000), step_settings, mesh, shardings)
    batch = abstract_batch(mesh, config.train.global_batch_size, config.data.max_seq_len,
                           config.train.grad_accum_steps)
    memory = step.lower(state, batch).compile().memory_analysis()
    fresh_outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes
    assert fresh_outputs < 2**20  # the state is updated in place
    return memory.argument_size_in_bytes + memory.temp_size_in_bytes + fresh_outputs


def test_the_8b_recipe_fits_one_host_of_eight_80gb_gpus(monkeypatch):
    """It used remat `dots_no_batch`: the projections' outputs for 4 x 4096 tokens per device
    over 32 layers, 117 GiB per device. JAX on a GPU takes 75% of its memory by default.
    Compiled as GPUs get the products (XLA:CPU's passes still run; see test_backend_layouts)."""
    from jaxtune.models import matmul

    assert len(jax.devices()) == 8
    monkeypatch.setattr(matmul, "cpu_layouts", lambda: False)
    config = parse_args(["--config", os.path.join(ROOT, "configs", "llama3_8b_sft.py"),
                         "--config.model.hf_path=/ckpt/llama", "--config.data.train_files=a.jsonl"],
                        default_config="unused")
    used = compiled_bytes_per_device(config, LlamaConfig.from_hf_dict(LLAMA_31_8B))
    print(f"llama3_8b_sft: {used / 2**30:.1f} GiB per device")
    assert used < 0.75 * 80e9
