"""Our safetensors writer produces checkpoints transformers loads as is."""

import json
import os

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import jaxtune
from jaxtune.models.hf_io import SafetensorsReader
from helpers import assert_close_scaled, make_hf_llama, torch_logits


def test_round_trip_through_transformers(tmp_path):
    make_hf_llama(tmp_path / "src", num_key_value_heads=2, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    model = jaxtune.from_pretrained(tmp_path / "src")
    _, state = nnx.split(model)
    jaxtune.save_pretrained(nnx.as_pure(state), model.config, tmp_path / "out", max_shard_bytes=50_000)
    assert os.path.isfile(tmp_path / "out" / "model.safetensors.index.json")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = np.random.RandomState(0).randint(0, 128, (2, 64))
    assert_close_scaled(model(jnp.asarray(ids)), torch_logits(reloaded, ids))


def test_bf16_checkpoint_loads_into_fp32_master_weights(tmp_path):
    ref = make_hf_llama(tmp_path / "src")
    ref = ref.to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "bf16")
    assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
    reader = SafetensorsReader(tmp_path / "bf16")
    assert str(reader.get("model.norm.weight").dtype) == "bfloat16"
    model = jaxtune.from_pretrained(tmp_path / "bf16")
    assert model.embed_tokens.dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(model.norm.weight[...]), ref.model.norm.weight.float().detach().numpy()
    )
