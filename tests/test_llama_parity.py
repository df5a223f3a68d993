"""The Flax Llama computes what transformers' PyTorch Llama computes on the same weights."""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

import jaxtune
from jaxtune.errors import UserError
from jaxtune.models.llama import LlamaConfig
from helpers import assert_close_scaled, edit_config, make_hf_llama, torch_logits

LLAMA31_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

VARIANTS = {
    "mha_llama2": dict(),
    "gqa_theta500k": dict(num_key_value_heads=2, rope_theta=500000.0),
    "mqa": dict(num_key_value_heads=1),
    "llama31_scaling": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA31_SCALING),
    "linear_scaling": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "tied_llama32": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "explicit_head_dim": dict(num_key_value_heads=2, head_dim=24),
    "biases": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
}


def _ids(batch=2, length=40, vocab=128, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, name):
    ref_model = make_hf_llama(tmp_path, **VARIANTS[name])
    # The llama3 case reaches 200 positions, far past original_max_position_embeddings=16.
    ids = _ids(length=200 if name == "llama31_scaling" else 40)
    model = jaxtune.from_pretrained(tmp_path)
    assert_close_scaled(model(jnp.asarray(ids)), torch_logits(ref_model, ids))


def test_sharded_checkpoint_with_index(tmp_path):
    ref_model = make_hf_llama(tmp_path, num_key_value_heads=2, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    ids = _ids()
    assert_close_scaled(jaxtune.from_pretrained(tmp_path)(jnp.asarray(ids)), torch_logits(ref_model, ids))


def test_config_in_transformers4_spelling(tmp_path):
    ref_model = make_hf_llama(tmp_path, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA31_SCALING)
    cfg = edit_config(
        tmp_path, rope_parameters=None, dtype=None, rope_theta=500000.0,
        rope_scaling={**LLAMA31_SCALING, "rope_type": None, "type": "llama3"}, torch_dtype="float32",
    )
    cfg["rope_scaling"].pop("rope_type")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    parsed = LlamaConfig.from_pretrained(tmp_path)
    assert parsed.rope_theta == 500000.0 and parsed.rope_scaling.rope_type == "llama3"
    assert parsed.dtype == "float32"
    ids = _ids(length=100)
    assert_close_scaled(jaxtune.from_pretrained(tmp_path)(jnp.asarray(ids)), torch_logits(ref_model, ids))


def test_config_in_transformers5_spelling(tmp_path):
    make_hf_llama(tmp_path, rope_theta=250000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with open(tmp_path / "config.json") as f:
        raw = json.load(f)
    assert "rope_parameters" in raw and "rope_scaling" not in raw  # what transformers 5 writes
    parsed = LlamaConfig.from_pretrained(tmp_path)
    assert parsed.rope_theta == 250000.0
    assert parsed.rope_scaling.rope_type == "linear" and parsed.rope_scaling.factor == 2.0


def test_both_rope_spellings_resolve_as_transformers_resolves_them(tmp_path):
    """A config with rope_parameters and the legacy keys (jaxtune's export writes both) that a
    user edited the 4.x way: transformers takes rope_scaling, fills in the top-level
    rope_theta, and lets a top-level original_max_position_embeddings override."""
    import torch
    import transformers

    scaling = {k: v for k, v in LLAMA31_SCALING.items() if k != "rope_theta"}  # transformers adds it in place
    make_hf_llama(tmp_path, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(scaling))
    edit_config(tmp_path, rope_parameters={**scaling, "rope_theta": 500000.0}, rope_theta=20000.0,
                rope_scaling={**scaling, "factor": 2.0}, original_max_position_embeddings=32)
    ref_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    rope = ref_model.config.rope_parameters  # the premise: transformers' own reading
    assert (rope["rope_theta"], rope["factor"], rope["original_max_position_embeddings"]) == (20000.0, 2.0, 32)
    parsed = LlamaConfig.from_pretrained(tmp_path)
    assert (parsed.rope_theta, parsed.rope_scaling.factor, parsed.rope_scaling.original_max_position_embeddings) == (
        20000.0, 2.0, 32)
    ids = _ids(length=200)
    assert_close_scaled(jaxtune.from_pretrained(tmp_path)(jnp.asarray(ids)), torch_logits(ref_model, ids))


@pytest.mark.parametrize("value", ["linear", 2.0, [["rope_type", "linear"], ["factor", 2.0]]])
def test_a_rope_scaling_that_is_not_an_object_is_refused(tmp_path, value):
    make_hf_llama(tmp_path)
    edit_config(tmp_path, rope_scaling=value)
    with pytest.raises(UserError, match="unsupported rope_scaling=.*: expected an object"):
        LlamaConfig.from_pretrained(tmp_path)


# Each math-relevant field changes the logits when changed (with the same weights).
FIELD_CHANGES = {
    "rope_theta": lambda c: {"rope_parameters": {**c["rope_parameters"], "rope_theta": 10000.0}},
    "factor": lambda c: {"rope_parameters": {**c["rope_parameters"], "factor": 2.0}},
    "low_freq_factor": lambda c: {"rope_parameters": {**c["rope_parameters"], "low_freq_factor": 2.0}},
    "high_freq_factor": lambda c: {"rope_parameters": {**c["rope_parameters"], "high_freq_factor": 8.0}},
    "original_max_position_embeddings": lambda c: {
        "rope_parameters": {**c["rope_parameters"], "original_max_position_embeddings": 64}
    },
    "rms_norm_eps": lambda c: {"rms_norm_eps": 0.5},
}


@pytest.mark.parametrize("field", sorted(FIELD_CHANGES))
def test_each_config_field_changes_the_logits(tmp_path, field):
    make_hf_llama(tmp_path, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA31_SCALING)
    ids = jnp.asarray(_ids(length=200))
    base = np.asarray(jaxtune.from_pretrained(tmp_path)(ids))
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    edit_config(tmp_path, **FIELD_CHANGES[field](cfg))
    changed = np.asarray(jaxtune.from_pretrained(tmp_path)(ids))
    assert np.max(np.abs(changed - base)) > 1e-3


def test_head_dim_and_tied_embeddings_shape_the_model(tmp_path):
    make_hf_llama(tmp_path / "hd", num_key_value_heads=2, head_dim=24)
    model = jaxtune.from_pretrained(tmp_path / "hd")
    assert model.layers.self_attn.q_proj.kernel.shape == (2, 64, 4, 24)
    # Dropping head_dim from config.json makes it hidden/heads = 16: the 24-wide weights no longer fit.
    edit_config(tmp_path / "hd", head_dim=None)
    with pytest.raises(UserError, match="config.json implies"):
        jaxtune.from_pretrained(tmp_path / "hd")

    make_hf_llama(tmp_path / "tied", tie_word_embeddings=True)
    tied = jaxtune.from_pretrained(tmp_path / "tied")
    assert tied.lm_head is None
    np.testing.assert_array_equal(tied.lm_head_kernel(), tied.embed_tokens[...].T)
    # Claiming untied weights for a tied checkpoint is refused: there is no lm_head tensor.
    edit_config(tmp_path / "tied", tie_word_embeddings=False)
    with pytest.raises(UserError, match="lm_head.weight"):
        jaxtune.from_pretrained(tmp_path / "tied")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "mistral"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters.rope_type"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters.rope_type"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1]}}, "mrope_section"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
    ],
)
def test_unsupported_configs_are_refused_by_name(tmp_path, change, field):
    make_hf_llama(tmp_path)
    edit_config(tmp_path, **change)
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        jaxtune.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"max_position_embeddings": None}, "max_position_embeddings=None is not an integer"),
    ({"rms_norm_eps": None}, "rms_norm_eps=None is not a number"),
    ({"hidden_size": "4k"}, "hidden_size='4k' is not an integer"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers=2.5 is not an integer"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "x"}}, "rope_scaling.factor='x' is not a number"),
    ({"attention_dropout": "none"}, "attention_dropout='none' is not a number"),
])
def test_a_config_field_of_the_wrong_type_is_named(tmp_path, change, message):
    """A null or a string in a hand-edited config.json was a TypeError or ValueError traceback."""
    make_hf_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))  # nulls kept (edit_config drops them)
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'config.json'}: {message}.")):
        jaxtune.from_pretrained(tmp_path)


@pytest.mark.parametrize("content, message", [(b"[1, 2]", "expected a JSON object, got a list"),
                                              (b'{"vocab_size": "\xff"}', "not valid JSON")])
def test_a_config_json_that_is_not_an_object_or_not_utf8_is_one_error(tmp_path, content, message):
    make_hf_llama(tmp_path)
    (tmp_path / "config.json").write_bytes(content.replace(b"\\xff", b"\xff"))
    with pytest.raises(UserError, match=re.escape(message)):
        jaxtune.from_pretrained(tmp_path)


def test_ids_outside_the_vocabulary_are_refused_in_an_eager_call(tmp_path):
    """An id past the vocabulary made the whole row NaN, and -1 silently took the last
    embedding row; torch raises IndexError."""
    make_hf_llama(tmp_path)
    model = jaxtune.from_pretrained(tmp_path)
    for bad in (128, -1):
        with pytest.raises(UserError, match=re.escape(f"input_ids must be in [0, 128) (the model's vocab_size), "
                                                      f"got {bad}.")):
            model(jnp.asarray([[1, 2, bad, 3]]))
    assert np.isfinite(np.asarray(model(jnp.asarray([[0, 127]])))).all()


def test_positions_of_one_row_apply_to_every_row(tmp_path):
    """transformers takes position_ids of shape [1, T] for a batch; here they failed in a reshape."""
    make_hf_llama(tmp_path)
    model = jaxtune.from_pretrained(tmp_path)
    ids = jnp.asarray(_ids(3, 40))
    positions = np.arange(5, 45)[None]
    expected = model(ids, jnp.asarray(np.repeat(positions, 3, axis=0)))
    np.testing.assert_array_equal(np.asarray(model(ids, jnp.asarray(positions))), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(model(ids, segment_ids=jnp.ones((1, 40), jnp.int32))),
                                  np.asarray(model(ids)))


def test_packed_segments_equal_separate_runs(tmp_path):
    make_hf_llama(tmp_path, num_key_value_heads=2)
    model = jaxtune.from_pretrained(tmp_path)
    # 160 positions: attention runs in query blocks of 64, and the segments straddle them.
    a, b = _ids(1, 50, seed=1), _ids(1, 90, seed=2)
    packed = np.concatenate([a, b, np.zeros((1, 20), int)], axis=1)
    segments = np.array([[1] * 50 + [2] * 90 + [0] * 20])
    positions = np.array([list(range(50)) + list(range(90)) + list(range(20))])
    out = np.asarray(model(jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments)))
    np.testing.assert_allclose(out[:, :50], np.asarray(model(jnp.asarray(a))), atol=1e-5)
    np.testing.assert_allclose(out[:, 50:140], np.asarray(model(jnp.asarray(b))), atol=1e-5)


def test_bf16_compute_with_fp32_params_stays_close(tmp_path):
    make_hf_llama(tmp_path, num_key_value_heads=2)
    ids = jnp.asarray(_ids())
    fp32 = np.asarray(jaxtune.from_pretrained(tmp_path)(ids))
    mixed_model = jaxtune.from_pretrained(tmp_path, compute_dtype="bfloat16")
    assert mixed_model.embed_tokens.dtype == jnp.float32
    mixed = np.asarray(mixed_model(ids))
    assert 0 < np.max(np.abs(mixed - fp32)) < 2e-2


def test_pickle_weights_only_when_asked(tmp_path):
    import torch

    ref_model = make_hf_llama(tmp_path)
    torch.save(ref_model.state_dict(), tmp_path / "pytorch_model.bin")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="allow_pickle=True"):
        jaxtune.from_pretrained(tmp_path)
    ids = _ids()
    model = jaxtune.from_pretrained(tmp_path, allow_pickle=True)
    assert_close_scaled(model(jnp.asarray(ids)), torch_logits(ref_model, ids))


def test_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="^model directory .*nope does not exist"):
        jaxtune.from_pretrained(tmp_path / "nope")
    with pytest.raises(UserError, match="config.json"):
        jaxtune.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    # it said "config.json: no config.json found"
    with pytest.raises(UserError, match=rf"config.json is a file; the model path is the directory that holds it \({tmp_path}\)"):
        LlamaConfig.from_pretrained(tmp_path / "config.json")
