"""Hugging Face safetensors <-> our parameter tree, streamed tensor by tensor.

Loading never holds a checkpoint in host memory: for each parameter it reads one Hugging
Face tensor at a time (one layer of a stacked parameter), converts it to our layout and
copies only the blocks this process's devices own into per-shard buffers, which then go
straight to their devices. Peak host memory is about one parameter's local shards plus
one tensor, so a pod loads a 70B model without any host holding all of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import zipfile
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxtune.errors import UserError
from jaxtune.models.llama import Llama, LlamaConfig

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Buffers some old checkpoints carry that are recomputed, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"

ParamPath = tuple[str, ...]
ShardingFn = Callable[[ParamPath, tuple[int, ...]], jax.sharding.Sharding]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How one of our parameters is stored by Hugging Face.

    `hf_name` has a `{layer}` placeholder for stacked parameters; `to_ours` turns one HF
    tensor into our per-layer layout and `to_hf` undoes it.
    """

    hf_name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.hf_name


def tensor_maps(c: LlamaConfig) -> dict[ParamPath, TensorMap]:
    """Every parameter of `Llama(c)` and where Hugging Face keeps it."""
    d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    same = lambda x: x  # noqa: E731

    def linear_in(heads):  # HF [heads*H, D] -> ours [D, heads, H]
        return TensorMap("", lambda x: x.T.reshape(d, heads, h), lambda x: x.reshape(d, heads * h).T)

    def bias_heads(heads):  # [heads*H] -> [heads, H]
        return TensorMap("", lambda x: x.reshape(heads, h), lambda x: x.reshape(heads * h))

    transpose = TensorMap("", lambda x: x.T, lambda x: x.T)
    identity = TensorMap("", same, same)
    o_proj = TensorMap("", lambda x: x.T.reshape(n, h, d), lambda x: x.reshape(n * h, d).T)

    layer = "model.layers.{layer}."
    table: dict[ParamPath, tuple[str, TensorMap]] = {
        ("embed_tokens",): (EMBED, identity),
        ("norm", "weight"): ("model.norm.weight", identity),
        ("layers", "input_layernorm", "weight"): (layer + "input_layernorm.weight", identity),
        ("layers", "post_attention_layernorm", "weight"): (layer + "post_attention_layernorm.weight", identity),
        ("layers", "self_attn", "q_proj", "kernel"): (layer + "self_attn.q_proj.weight", linear_in(n)),
        ("layers", "self_attn", "k_proj", "kernel"): (layer + "self_attn.k_proj.weight", linear_in(k)),
        ("layers", "self_attn", "v_proj", "kernel"): (layer + "self_attn.v_proj.weight", linear_in(k)),
        ("layers", "self_attn", "o_proj", "kernel"): (layer + "self_attn.o_proj.weight", o_proj),
        ("layers", "mlp", "gate_proj", "kernel"): (layer + "mlp.gate_proj.weight", transpose),
        ("layers", "mlp", "up_proj", "kernel"): (layer + "mlp.up_proj.weight", transpose),
        ("layers", "mlp", "down_proj", "kernel"): (layer + "mlp.down_proj.weight", transpose),
    }
    if c.attention_bias:
        table[("layers", "self_attn", "q_proj", "bias")] = (layer + "self_attn.q_proj.bias", bias_heads(n))
        table[("layers", "self_attn", "k_proj", "bias")] = (layer + "self_attn.k_proj.bias", bias_heads(k))
        table[("layers", "self_attn", "v_proj", "bias")] = (layer + "self_attn.v_proj.bias", bias_heads(k))
        table[("layers", "self_attn", "o_proj", "bias")] = (layer + "self_attn.o_proj.bias", identity)
    if c.mlp_bias:
        for name in ("gate_proj", "up_proj", "down_proj"):
            table[("layers", "mlp", name, "bias")] = (layer + f"mlp.{name}.bias", identity)
    if not c.tie_word_embeddings:
        table[("lm_head", "kernel")] = (HEAD, transpose)
    return {path: dataclasses.replace(m, hf_name=name) for path, (name, m) in table.items()}


# ---- Reading -------------------------------------------------------------------------------
class SafetensorsReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint, or of
    PyTorch pickle weights when allowed (memory-mapped)."""

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False):
        self.path = str(path)
        index = os.path.join(self.path, SAFETENSORS_INDEX)
        single = os.path.join(self.path, SAFETENSORS_FILE)
        self._pickled: dict[str, Any] | None = None  # the pickle weights' tensors, in pickle mode
        if os.path.isfile(single):  # before the index, as transformers: a sharded save into a
            # directory that held one file leaves both, and both readers must load the same weights
            with _safe_open(single) as f:
                self.file_of = {name: single for name in f.keys()}
            source = single
        elif os.path.isfile(index):
            weight_map = _read_weight_map(index)
            self.file_of = {name: os.path.join(self.path, file) for name, file in weight_map.items()}
            for file in set(self.file_of.values()):
                if not os.path.isfile(file):
                    raise UserError(f"{index} lists {os.path.basename(file)}, which does not exist.")
            source = index
        elif any(os.path.exists(os.path.join(self.path, p)) for p in PICKLE_FILES):
            if not allow_pickle:
                raise UserError(
                    f"{self.path} holds only PyTorch pickle weights (pytorch_model.bin), which can run "
                    "code when loaded; convert them to safetensors, or pass allow_pickle=True "
                    "(--config.model.allow_pickle=True for run.py)."
                )
            self.file_of = {}
            self._pickled = _load_pickle_weights(self.path)
            source = self.path
        else:
            raise UserError(f"{self.path}: no model.safetensors or {SAFETENSORS_INDEX} found.")
        if not (self.file_of or self._pickled):
            raise UserError(f"{source} holds no tensors (an interrupted save or conversion?).")
        self._handles: dict[str, Any] = {}

    def names(self) -> set[str]:
        if self._pickled is not None:
            return set(self._pickled)
        return set(self.file_of)

    def get(self, name: str) -> np.ndarray:
        if self._pickled is not None:
            return _torch_to_numpy(self._pickled[name])
        return self._read(name, lambda h: h.get_tensor(name))

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return tuple(self._read(name, lambda h: h.get_slice(name).get_shape()))

    def dtype(self, name: str) -> str:
        """The stored element type as safetensors names it (F32, BF16, I8, ...)."""
        if self._pickled is not None:
            return _TORCH_DTYPE_NAMES.get(str(self._pickled[name].dtype), str(self._pickled[name].dtype))
        return self._read(name, lambda h: h.get_slice(name).get_dtype())

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of a tensor, without reading the rest of it."""
        if self._pickled is not None:
            return _torch_to_numpy(self._pickled[name][start:stop])
        return self._read(name, lambda h: h.get_slice(name)[start:stop])

    def _read(self, name: str, fn):
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = _safe_open(file)
        try:
            return fn(self._handles[file])
        except SafetensorError as e:
            raise UserError(f"{file}: cannot read tensor {name} ({e}).") from None

    def close(self):
        self._handles.clear()


_TORCH_DTYPE_NAMES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
                      "torch.float64": "F64", "torch.int8": "I8", "torch.uint8": "U8"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _safe_open(file: str):
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as e:  # e.g. a download that stopped part way
        raise UserError(f"{file}: cannot read the safetensors file ({e}).") from None


def _read_weight_map(index: str) -> dict[str, str]:
    try:
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
    except (ValueError, AttributeError) as e:  # bad JSON or not UTF-8; AttributeError: the JSON is not an object
        raise UserError(f"{index}: cannot read the index file ({e}).") from None
    if not isinstance(weight_map, dict):
        raise UserError(f"{index}: no 'weight_map' object in the index file.")
    return weight_map


def _load_pickle_weights(path: str) -> dict[str, Any]:
    """torch tensors, memory-mapped where the file allows it (any torch >= 1.6 save): each
    tensor's bytes are read when `_torch_to_numpy` converts it, one at a time, as with
    safetensors, instead of the whole checkpoint upcast to float32 in host memory."""
    try:
        import torch
    except ImportError:
        raise UserError("loading pytorch_model.bin needs torch installed.") from None
    files = [os.path.join(path, "pytorch_model.bin")]
    index = os.path.join(path, "pytorch_model.bin.index.json")
    if os.path.isfile(index):
        files = sorted({os.path.join(path, v) for v in _read_weight_map(index).values()})
    out = {}
    for file in files:
        if not os.path.isfile(file):
            raise UserError(f"{index} lists {os.path.basename(file)}, which does not exist.")
        try:  # the legacy (non-zip) format cannot be mapped, so it is read whole
            tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise UserError(f"{file}: cannot read the PyTorch weights file ({str(e).splitlines()[0]}).") from None
        if not isinstance(tensors, dict):
            raise UserError(f"{file}: expected a state dict of tensors, found a {type(tensors).__name__}.")
        out.update(tensors)
    return out


def _torch_to_numpy(t) -> np.ndarray:
    """A view of a torch tensor's bytes as numpy, bfloat16 kept as bfloat16 (as safetensors gives)."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _param_leaves(abstract_state) -> Iterator[tuple[ParamPath, jax.ShapeDtypeStruct]]:
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(nnx.as_pure(abstract_state))[0]:
        yield tuple(str(k.key) for k in key_path), leaf


def _assemble(
    reader: SafetensorsReader, tmap: TensorMap, shape, dtype, sharding: jax.sharding.Sharding, layers: int
) -> jax.Array:
    """Builds one sharded parameter from HF tensors, touching each HF tensor once."""
    index_map = sharding.addressable_devices_indices_map(shape)
    # Devices holding the same block share one host buffer.
    blocks: dict[tuple, np.ndarray] = {}
    block_of_device = {}
    for device, index in index_map.items():
        key = tuple((s.start, s.stop) for s in index)
        if key not in blocks:
            blocks[key] = np.empty(tuple(len(range(*s.indices(n))) for s, n in zip(index, shape)), dtype)
        block_of_device[device] = key

    def fill(layer_slice, tensor):
        for key, buf in blocks.items():
            slices = [slice(a, b) for a, b in key]
            if layer_slice is not None:
                lo = slices[0].start or 0
                hi = slices[0].stop if slices[0].stop is not None else shape[0]
                if not lo <= layer_slice < hi:
                    continue
                buf[layer_slice - lo] = tensor[tuple(slices[1:])]
            else:
                buf[...] = tensor[tuple(slices)]

    def read(name, expect):
        raw = reader.get(name)
        expect_hf = tmap.to_hf(np.empty(expect, np.int8)).shape
        if raw.shape != expect_hf:
            raise UserError(
                f"{reader.path}: tensor {name} has shape {raw.shape} but config.json implies {expect_hf}."
            )
        return tmap.to_ours(raw).astype(dtype)

    if tmap.stacked:
        for layer in range(layers):
            fill(layer, read(tmap.hf_name.format(layer=layer), tuple(shape[1:])))
    else:
        fill(None, read(tmap.hf_name, tuple(shape)))
    arrays = [jax.device_put(blocks[block_of_device[d]], d) for d in index_map]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _hf_names(tmap: TensorMap, config: LlamaConfig) -> list[str]:
    return [tmap.hf_name.format(layer=i) for i in range(config.num_hidden_layers)] if tmap.stacked else [tmap.hf_name]


def _require(path: str, available: set[str], names: list[str]) -> None:
    missing = [n for n in names if n not in available]
    if missing:
        raise UserError(f"{path}: the checkpoint has no tensor {missing[0]}.")


def _check_layout(reader: SafetensorsReader, abstract_state, config: LlamaConfig) -> set[str]:
    """From the headers alone: every tensor `abstract_state` needs is there with the shape
    config.json implies, and nothing else is. Returns the names it uses."""
    maps = tensor_maps(config)
    available = reader.names()
    used: set[str] = set()
    for param_path, leaf in _param_leaves(abstract_state):
        tmap = maps.get(param_path)
        if tmap is None:
            raise RuntimeError(f"no Hugging Face name for parameter {'/'.join(param_path)}")
        names = _hf_names(tmap, config)
        _require(reader.path, available, names)
        expect = tmap.to_hf(np.empty(leaf.shape[1:] if tmap.stacked else leaf.shape, np.int8)).shape
        for name in names:
            if tuple(reader.shape(name)) != tuple(expect):
                raise UserError(
                    f"{reader.path}: tensor {name} has shape {tuple(reader.shape(name))} but config.json implies "
                    f"{tuple(expect)}."
                )
            if reader.dtype(name) not in FLOAT_DTYPES:  # cast to float, quantized values are garbage weights
                raise UserError(
                    f"{reader.path}: tensor {name} is stored as {reader.dtype(name)}, not as floating point; "
                    "a quantized checkpoint must be dequantized (saved in float32, float16 or bfloat16) "
                    "before full fine-tuning."
                )
        used.update(names)
    if config.tie_word_embeddings and HEAD in available:
        used.add(HEAD)  # compared with the embedding when loaded (_check_tied_head)
    unexpected = sorted(n for n in available - used if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise UserError(
            f"{reader.path}: the checkpoint has tensors this Llama does not use, e.g. {unexpected[0]} "
            f"({len(unexpected)} in all); is config.json right for these weights?"
        )
    return used


def check_checkpoint(path: str | os.PathLike, config: LlamaConfig, abstract_state, allow_pickle: bool = False) -> None:
    """Reads only the index and headers: the weight files hold every tensor this config needs,
    with its shape, and no other. Run before any expensive work, so a wrong model directory
    fails at once (not after tokenizing)."""
    reader = SafetensorsReader(path, allow_pickle=allow_pickle)  # pickles: memory-mapped, so cheap too
    try:
        _check_layout(reader, abstract_state, config)
    finally:
        reader.close()


def load_params(
    path: str | os.PathLike,
    abstract_state,
    config: LlamaConfig,
    sharding_fn: ShardingFn | None = None,
    allow_pickle: bool = False,
):
    """Loads Hugging Face weights into a pure state shaped like `abstract_state`."""
    reader = SafetensorsReader(path, allow_pickle=allow_pickle)
    maps = tensor_maps(config)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's, on every process
    leaves = {}
    try:
        used = _check_layout(reader, abstract_state, config)
        for param_path, leaf in _param_leaves(abstract_state):
            sharding = sharding_fn(param_path, leaf.shape) if sharding_fn else default
            leaves[param_path] = _assemble(
                reader, maps[param_path], leaf.shape, leaf.dtype, sharding, config.num_hidden_layers
            )
        if HEAD in used and config.tie_word_embeddings:
            _check_tied_head(reader)
    finally:
        reader.close()
    return _rebuild(abstract_state, leaves)


def _check_tied_head(reader: SafetensorsReader, block: int = 8192):
    """Accepts a tied checkpoint that also stores lm_head.weight (some exporters and mergers
    write it) when it equals the embedding: transformers then ties the two and ignores it.
    When they differ transformers unties them and uses the stored head, which
    tie_word_embeddings=true cannot express, so that is refused rather than computed differently.
    Compares a block of rows at a time, so it never holds either whole tensor.
    """
    vocab = reader.shape(EMBED)[0]
    same = reader.shape(HEAD) == reader.shape(EMBED) and all(
        np.array_equal(reader.rows(EMBED, i, min(i + block, vocab)), reader.rows(HEAD, i, min(i + block, vocab)))
        for i in range(0, vocab, block)
    )
    if not same:
        raise UserError(
            f"{reader.path}: config.json has tie_word_embeddings=true but the checkpoint's {HEAD} differs "
            f"from {EMBED}; set tie_word_embeddings to false if the head was trained separately."
        )


def _rebuild(abstract_state, leaves: dict[ParamPath, jax.Array]):
    pure = nnx.as_pure(abstract_state)
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
    values = [leaves[tuple(str(k.key) for k in kp)] for kp, _ in flat]
    return jax.tree_util.tree_unflatten(treedef, values)


# ---- Writing -------------------------------------------------------------------------------
def iter_hf_tensors(params, config: LlamaConfig, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, tensor) one at a time from a pure parameter state (gathered per tensor)."""
    maps = tensor_maps(config)
    for param_path, leaf in _param_leaves(params):
        tmap = maps[param_path]
        # A layer at a time: the whole [L, ...] stack of a 70B model's MLP is 70 GiB in float32.
        parts = ([(tmap.hf_name.format(layer=i), leaf[i]) for i in range(leaf.shape[0])] if tmap.stacked
                 else [(tmap.hf_name, leaf)])
        for name, part in parts:
            host = np.asarray(jax.device_get(part))
            if dtype is not None:
                host = host.astype(dtype, copy=False)
            yield name, np.ascontiguousarray(tmap.to_hf(host))


_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _weight_files(out_dir: str) -> list[str]:
    """Weight files a loader could pick up (transformers prefers model.safetensors, jaxtune the
    index): any of them left from an earlier save would be read instead of, or with, ours."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(n for n in names if n.endswith(".safetensors") or n == SAFETENSORS_INDEX
                  or n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json")))


def _hf_sizes(params, config: LlamaConfig, itemsize: int) -> list[tuple[str, int]]:
    """(HF name, bytes) of every tensor `iter_hf_tensors` yields, in its order, from shapes alone."""
    maps = tensor_maps(config)
    out = []
    for param_path, leaf in _param_leaves(params):
        tmap = maps[param_path]
        per = math.prod(leaf.shape[1:] if tmap.stacked else leaf.shape) * itemsize
        out += [(name, per) for name in _hf_names(tmap, config)]
    return out


def _check_params_fit(params, config: LlamaConfig) -> None:
    if not isinstance(config, LlamaConfig):
        raise UserError(f"save_pretrained needs a jaxtune LlamaConfig (model.config), got {type(config).__name__}.")
    _, abstract = abstract_model(config)
    expected = {path: leaf.shape for path, leaf in _param_leaves(abstract)}
    try:
        given = {path: tuple(leaf.shape) for path, leaf in _param_leaves(params)}
    except AttributeError:
        raise UserError("save_pretrained needs the parameter state (nnx.state(model)), not "
                        f"{type(params).__name__}.") from None
    for path in sorted(set(expected) | set(given)):
        if expected.get(path) != given.get(path):
            raise UserError(f"parameter {'/'.join(path)} is {given.get(path)} but this config implies "
                            f"{expected.get(path)}: params and config are from different models.")


def save_pretrained(
    params, config: LlamaConfig, out_dir: str | os.PathLike, dtype: str = "float32",
    max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
) -> None:
    """Writes `config.json` and safetensors (sharded with an index past `max_shard_bytes`).

    A directory that already holds weights is refused unless `overwrite`, which deletes them
    first. Shards are planned from the shapes and each is written as soon as it is full, so
    host memory holds about one shard, not the model.
    """
    out_dir = os.fspath(out_dir)
    _check_dtype(dtype, "save_pretrained: dtype")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} exists and is not a directory.")
    if isinstance(params, nnx.Module):
        params = nnx.state(params)
    _check_params_fit(params, config)
    old = _weight_files(out_dir)
    if old and not overwrite:
        raise UserError(f"{out_dir} already holds weights ({', '.join(old[:3])}{', ...' if len(old) > 3 else ''}); "
                        "choose another directory or pass overwrite=True to replace them.")
    os.makedirs(out_dir, exist_ok=True)
    for name in old:
        os.remove(os.path.join(out_dir, name))

    np_dtype = _NUMPY_DTYPES[dtype]
    shard_of, count, size = {}, 0, 0
    for name, nbytes in _hf_sizes(params, config, np.dtype(np_dtype).itemsize):
        if count == 0 or (size and size + nbytes > max_shard_bytes):
            count, size = count + 1, 0
        shard_of[name] = count
        size += nbytes

    def file_name(i: int) -> str:
        return SAFETENSORS_FILE if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"

    metadata = {"format": "pt"}
    current, index, total = {}, 1, 0
    for name, tensor in iter_hf_tensors(params, config, np_dtype):
        if shard_of[name] != index:
            save_file(current, os.path.join(out_dir, file_name(index)), metadata=metadata)
            current, index = {}, shard_of[name]
        current[name] = tensor
        total += tensor.nbytes
    save_file(current, os.path.join(out_dir, file_name(index)), metadata=metadata)
    if count > 1:
        weight_map = {name: file_name(i) for name, i in shard_of.items()}
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_config = dict(config.to_hf_dict(), dtype=dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)


# ---- The public entry point ------------------------------------------------------------------
def abstract_model(config: LlamaConfig, *, param_dtype="float32", compute_dtype=None, remat="none"):
    """(graphdef, abstract state) of a Llama without allocating any weights."""
    model = nnx.eval_shape(
        lambda: Llama(config, param_dtype=param_dtype, compute_dtype=compute_dtype, remat=remat, rngs=nnx.Rngs(0))
    )
    return nnx.split(model)


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    remat: str = "none",
    sharding_fn: ShardingFn | None = None,
    allow_pickle: bool = False,
) -> Llama:
    """Loads a local Hugging Face Llama directory as a `Llama`.

    `dtype` is the parameter dtype (float32 master weights by default), `compute_dtype`
    the matmul input dtype (defaults to `dtype`). `sharding_fn(path, shape)` places each
    parameter straight into its sharding (see `jaxtune.sharding.param_sharding_fn`).
    Pickle weights (`pytorch_model.bin`) are refused unless `allow_pickle=True`.
    """
    path = os.fspath(path)
    config = LlamaConfig.from_pretrained(path)  # a missing directory, or a file named instead, says so
    _check_dtype(dtype, "dtype")
    if compute_dtype is not None:
        _check_dtype(compute_dtype, "compute_dtype")
    graphdef, abstract = abstract_model(config, param_dtype=dtype, compute_dtype=compute_dtype, remat=remat)
    params = load_params(path, abstract, config, sharding_fn=sharding_fn, allow_pickle=allow_pickle)
    return nnx.merge(graphdef, params)


def _check_dtype(name: str, what: str):
    if name not in _NUMPY_DTYPES:
        raise UserError(f"{what} must be float32, bfloat16 or float16, got {name!r}.")
