"""Our safetensors writer produces checkpoints transformers loads as is; what we read, and refuse, clearly."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import jaxtune
from jaxtune.errors import UserError
from jaxtune.models import hf_io
from jaxtune.models.hf_io import SafetensorsReader
from jaxtune.models.llama import LlamaConfig
from helpers import TINY, assert_close_scaled, make_hf_llama, torch_logits


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


def test_saving_over_earlier_weights_is_refused_unless_overwrite(tmp_path):
    """An earlier save's files left in place could be read instead of the new ones (by jaxtune
    or by transformers): two different models, no warning."""
    make_hf_llama(tmp_path / "src", num_key_value_heads=2)
    model = jaxtune.from_pretrained(tmp_path / "src")
    state = nnx.as_pure(nnx.split(model)[1])
    out = tmp_path / "out"
    jaxtune.save_pretrained(state, model.config, out, max_shard_bytes=50_000)
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 2
    tuned = jax.tree.map(lambda x: x * 1.1, state)
    with pytest.raises(UserError, match=r"out already holds weights \(model-00001-of-.*overwrite=True"):
        jaxtune.save_pretrained(tuned, model.config, out)
    jaxtune.save_pretrained(tuned, model.config, out, overwrite=True)
    assert sorted(n for n in os.listdir(out) if "safetensors" in n) == ["model.safetensors"]
    ids = np.random.RandomState(0).randint(0, 128, (2, 24))
    ours = jaxtune.from_pretrained(out)(jnp.asarray(ids))
    theirs = torch_logits(transformers.LlamaForCausalLM.from_pretrained(out).eval(), ids)
    assert_close_scaled(ours, theirs)
    assert not np.allclose(np.asarray(ours), np.asarray(model(jnp.asarray(ids))), atol=1e-3)  # the new weights


def test_save_pretrained_mistakes_are_one_clear_error(tmp_path):
    make_hf_llama(tmp_path / "src", num_key_value_heads=2)
    model = jaxtune.from_pretrained(tmp_path / "src")
    state = nnx.as_pure(nnx.split(model)[1])
    with pytest.raises(UserError, match="save_pretrained: dtype must be float32, bfloat16 or float16, got 'bf16'"):
        jaxtune.save_pretrained(state, model.config, tmp_path / "a", dtype="bf16")
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="exists and is not a directory"):
        jaxtune.save_pretrained(state, model.config, tmp_path / "file")
    with pytest.raises(UserError, match="needs a jaxtune LlamaConfig"):
        jaxtune.save_pretrained(state, str(tmp_path / "src"), tmp_path / "b")
    other = LlamaConfig.from_hf_dict({**model.config.to_hf_dict(), "num_key_value_heads": 4})
    with pytest.raises(UserError, match="params and config are from different models"):
        jaxtune.save_pretrained(state, other, tmp_path / "c")
    jaxtune.save_pretrained(model, model.config, tmp_path / "d")  # the model itself is accepted too
    assert os.path.isfile(tmp_path / "d" / "model.safetensors")


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


def test_tied_checkpoint_that_also_stores_lm_head(tmp_path):
    make_hf_llama(tmp_path, num_key_value_heads=2, tie_word_embeddings=True)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()  # as some exporters write it
    save_file(tensors, file, metadata={"format": "pt"})
    ids = np.random.RandomState(0).randint(0, 128, (2, 24))
    reference = torch_logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval(), ids)
    assert_close_scaled(jaxtune.from_pretrained(tmp_path)(jnp.asarray(ids)), reference)

    # A head that differs is used by transformers (it unties them), which tied weights cannot express.
    tensors["lm_head.weight"][-1] += 1.0
    save_file(tensors, file, metadata={"format": "pt"})
    untied = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)
    with pytest.raises(UserError, match="tie_word_embeddings=true but the checkpoint's lm_head.weight differs"):
        jaxtune.from_pretrained(tmp_path)
    with pytest.raises(UserError):  # compared a block of rows at a time: the last block is checked too
        hf_io._check_tied_head(SafetensorsReader(tmp_path), block=48)


def _llama3_rope_without_original_length(d):
    d["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "rope_theta": 5e5}
    del d["max_position_embeddings"]


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("num_attention_heads"), "'num_attention_heads'"),
    (lambda d: d.pop("hidden_size"), "'hidden_size'"),  # head_dim is absent, so hidden_size is read first
    (lambda d: d.pop("vocab_size"), "'vocab_size'"),
    (_llama3_rope_without_original_length, "rope_parameters.original_max_position_embeddings"),
], ids=["num_attention_heads", "hidden_size", "vocab_size", "llama3_rope_length"])
def test_incomplete_config_is_a_user_error_naming_the_field(edit, field):
    d = transformers.LlamaConfig(**TINY).to_dict()
    d.pop("head_dim", None)
    edit(d)
    with pytest.raises(UserError, match=f"^config.json: .*{field}"):
        LlamaConfig.from_hf_dict(d)


def _truncate(file):
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("shards, damage, file", [
    (None, _truncate, "model.safetensors"),  # a download that stopped part way
    ("40KB", _truncate, "model-00002-of-*.safetensors"),
    ("40KB", lambda f: open(f, "a").write("garbage"), "model.safetensors.index.json"),
], ids=["truncated_file", "truncated_shard", "malformed_index"])
def test_unreadable_checkpoint_files_are_user_errors(tmp_path, shards, damage, file):
    make_hf_llama(tmp_path, max_shard_size=shards)
    [path] = tmp_path.glob(file)
    damage(path)
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}: cannot read the .* file \\(.+\\)\\.$"):
        jaxtune.from_pretrained(tmp_path)


@pytest.mark.parametrize("shards", [None, "40KB"])
def test_a_checkpoint_that_holds_no_tensors_is_one_error(tmp_path, shards):
    """An empty model.safetensors (or an index with an empty weight_map) was taken for pickle
    weights: AttributeError '_pickled'."""
    make_hf_llama(tmp_path, max_shard_size=shards)
    if shards:
        index = tmp_path / "model.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": {}}))
        where = index
    else:
        where = tmp_path / "model.safetensors"
        save_file({}, str(where))
    with pytest.raises(UserError, match=re.escape(f"{where} holds no tensors")):
        jaxtune.from_pretrained(tmp_path)


@pytest.mark.parametrize("pickled", [False, True], ids=["safetensors", "pickle"])
def test_integer_weights_are_refused_not_cast(tmp_path, pickled):
    """An int8 tensor of the right shape (a quantized export) was cast to float and trained as
    if it were the weights."""
    make_hf_llama(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    state[name] = np.clip(np.round(state[name] * 127 / np.abs(state[name]).max()), -127, 127).astype(np.int8)
    if pickled:
        os.remove(tmp_path / "model.safetensors")
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    else:
        save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=re.escape(f"tensor {name} is stored as I8, not as floating point; a quantized")):
        jaxtune.from_pretrained(tmp_path, allow_pickle=pickled)


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[]"])
def test_an_index_that_is_not_utf8_or_not_an_object_is_one_error(tmp_path, content):
    make_hf_llama(tmp_path, max_shard_size="40KB")
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(f"{index}: cannot read the index file")):
        jaxtune.from_pretrained(tmp_path)


def test_a_config_without_eos_writes_none_not_an_empty_list():
    config = LlamaConfig.from_hf_dict({**TINY, "eos_token_id": None})
    assert config.eos_token_id == () and config.to_hf_dict()["eos_token_id"] is None
    assert LlamaConfig.from_hf_dict(config.to_hf_dict()).eos_token_id == ()
    assert LlamaConfig.from_hf_dict(TINY).bos_token_id == 1  # absent: transformers' default, not null


def test_a_directory_with_one_file_and_an_index_loads_what_transformers_loads(tmp_path):
    """transformers' own sharded save into a directory that held model.safetensors leaves both;
    jaxtune read the index and transformers the single file: two models, no warning."""
    make_hf_llama(tmp_path / "src", num_key_value_heads=2)
    make_hf_llama(tmp_path / "other", seed=1, num_key_value_heads=2, max_shard_size="20KB")
    for name in os.listdir(tmp_path / "other"):
        if name.startswith("model-") or name.endswith(".index.json"):
            shutil.copy(tmp_path / "other" / name, tmp_path / "src" / name)
    ids = np.random.RandomState(0).randint(0, 128, (2, 24))
    theirs = torch_logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "src").eval(), ids)
    assert_close_scaled(jaxtune.from_pretrained(tmp_path / "src")(jnp.asarray(ids)), theirs)
    assert not np.allclose(theirs, torch_logits(transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "other").eval(), ids), atol=1e-3)  # the two are different models


def test_save_pretrained_fetches_one_layer_at_a_time(tmp_path, monkeypatch):
    """It fetched each whole [layers, ...] parameter (and made a bfloat16 copy of it): for a
    70B model's MLP, 70 GiB of host memory where the shards are 5 GiB."""
    make_hf_llama(tmp_path / "src", num_hidden_layers=4)
    model = jaxtune.from_pretrained(tmp_path / "src")
    fetched = []
    device_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: fetched.append(np.size(x)) or device_get(x))
    jaxtune.save_pretrained(model, model.config, tmp_path / "out", dtype="bfloat16")
    largest_tensor = max(TINY["vocab_size"] * TINY["hidden_size"], TINY["hidden_size"] * TINY["intermediate_size"])
    assert fetched and max(fetched) <= largest_tensor
    ids = np.random.RandomState(0).randint(0, 128, (2, 24))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype="float32").eval()
    assert_close_scaled(jaxtune.from_pretrained(tmp_path / "out")(jnp.asarray(ids)), torch_logits(reloaded, ids))



def _save_pickled(model, path, shards: int = 1, dtype=None):
    """`model`'s weights as PyTorch pickles (the pre-safetensors format), sharded with an index."""
    state = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return state
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({n: state[n] for n in part}, path / file)
        weight_map.update({n: file for n in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return state


def test_pickle_weights_are_read_one_tensor_at_a_time_in_their_own_dtype(tmp_path):
    """bf16 pickles (most Llama 2 era checkpoints) used to be upcast to float32 whole, in host
    memory, before the first tensor was placed: 2x the checkpoint's size for a 7B model."""
    model = make_hf_llama(tmp_path / "safe", num_key_value_heads=2)
    shutil.copytree(tmp_path / "safe", tmp_path / "pickled", ignore=shutil.ignore_patterns("*.safetensors"))
    state = _save_pickled(model, tmp_path / "pickled", shards=3, dtype=torch.bfloat16)
    reader = SafetensorsReader(tmp_path / "pickled", allow_pickle=True)
    name = "model.layers.1.mlp.up_proj.weight"
    got = reader.get(name)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got.view(np.int16), state[name].view(torch.int16).numpy())
    np.testing.assert_array_equal(reader.rows(name, 3, 5).view(np.int16), state[name][3:5].view(torch.int16).numpy())
    # the same parameters as from the same bf16 weights in safetensors
    save_file({k: v.view(torch.int16).numpy().view(jnp.bfloat16) for k, v in state.items()},
              str(tmp_path / "safe" / "model.safetensors"))
    for param_dtype in ("bfloat16", "float32"):
        ours = nnx.as_pure(nnx.split(jaxtune.from_pretrained(tmp_path / "pickled", dtype=param_dtype,
                                                             allow_pickle=True))[1])
        ref = nnx.as_pure(nnx.split(jaxtune.from_pretrained(tmp_path / "safe", dtype=param_dtype))[1])
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours, ref)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_opening_pickle_weights_maps_them_instead_of_reading_them(tmp_path):
    torch.save({"big": torch.ones(32 * 2**20, dtype=torch.bfloat16)}, tmp_path / "pytorch_model.bin")  # 64 MiB
    before = _resident_bytes()
    reader = SafetensorsReader(tmp_path, allow_pickle=True)
    assert reader.shape("big") == (32 * 2**20,)
    assert _resident_bytes() - before < 16 * 2**20  # was 192 MiB: the file read, then a float32 copy
    assert reader.rows("big", 0, 4).tolist() == [1.0] * 4


def test_a_pickle_checkpoint_of_the_wrong_shape_fails_the_check_before_loading(tmp_path):
    """The start-of-run check (before tokenizing) skipped pickle weights, which were only
    readable whole; a wrong model directory then failed after the data work."""
    model = make_hf_llama(tmp_path, num_key_value_heads=2)
    os.remove(tmp_path / "model.safetensors")
    _save_pickled(model, tmp_path)
    config = LlamaConfig.from_pretrained(tmp_path)
    wider = LlamaConfig.from_hf_dict({**config.to_hf_dict(), "intermediate_size": config.intermediate_size * 2})
    abstract = hf_io.abstract_model(wider)[1]
    hf_io.check_checkpoint(tmp_path, config, hf_io.abstract_model(config)[1], allow_pickle=True)
    with pytest.raises(UserError, match=r"tensor model.layers.0.mlp.\w+_proj.weight has shape \(\d+, \d+\) but "):
        hf_io.check_checkpoint(tmp_path, wider, abstract, allow_pickle=True)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_format"])
def test_unreadable_pickle_weights_are_user_errors(tmp_path, legacy):
    model = make_hf_llama(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    if legacy:  # the pre-1.6 format cannot be memory-mapped, but still loads
        jaxtune.from_pretrained(tmp_path, allow_pickle=True)
    _truncate(tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model.bin: cannot read the PyTorch weights file \(.+\)\.$"):
        jaxtune.from_pretrained(tmp_path, allow_pickle=True)


def test_a_plain_import_reaches_the_documented_submodules():
    """The README scripts against `jaxtune.train.run` and `jaxtune.sharding.param_sharding_fn`
    after `import jaxtune`; a fresh interpreter, since this process imported them already.
    The import itself must stay free of JAX (run.py may re-exec before JAX starts)."""
    import subprocess
    import sys

    code = ("import sys, jaxtune; assert 'jax' not in sys.modules; "
            "print(callable(jaxtune.train.run), callable(jaxtune.sharding.param_sharding_fn), "
            "callable(jaxtune.config.load_recipe)); "
            "print(hasattr(jaxtune, 'no_such_module'), hasattr(jaxtune, '_private'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True", "False", "False"]
