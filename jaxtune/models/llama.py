"""Llama in Flax NNX, numerically matching `transformers`' PyTorch `LlamaForCausalLM`.

Layout decisions (see DESIGN.md):
- Decoder layers are created with `nnx.vmap`, so every layer parameter has a leading
  `[L]` axis, and run with one `jax.lax.scan`: compile time does not grow with depth.
- Projections run on flattened tokens `[M = B*T, D]`; XLA:CPU is much slower when batch
  and time are both contracted in the backward pass.
- Attention kernels keep the heads axis (`[D, N, H]`) so tensor parallelism splits heads.
- Parameters live in `param_dtype`; matmul inputs are cast to `compute_dtype` and
  accumulate in float32; norms, softmax, RoPE and the residual stream stay in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import UserError, check_local_dir
from jaxtune.sharding import BATCH_AXES, activation_mesh, constrain
from jaxtune.models.attention import ATTENTION_LSE, ATTENTION_OUT, causal_attention
from jaxtune.models.matmul import dense, product, rounded_result_dtype
from jaxtune.models.swiglu import swiglu

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_KEYS = {
    "rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings", "partial_rotary_factor",
}

REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every activation is kept for the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,
    # the projections' outputs, and attention's output and log-sum-exp: never its [T, T]
    # scores (plain `dots_saveable` kept them, memory quadratic in the sequence length)
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, ATTENTION_LSE)),
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # attention recomputed
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_type` "linear" or "llama3", as in transformers)."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture, with the meaning of the Hugging Face `config.json` fields."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    dtype: str | None = None  # the checkpoint's storage dtype, informational

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.head_dim % 2:
            raise UserError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")

    @property
    def context_length(self) -> int:
        """Positions the model was trained on: linear RoPE scaling keeps the original
        max_position_embeddings and stretches it by `factor` (e.g. 4096 x 4 for a 16k model);
        llama3 scaling's max_position_embeddings is already the extended length."""
        s = self.rope_scaling
        factor = s.factor if s is not None and s.rope_type == "linear" else 1.0
        return int(self.max_position_embeddings * factor)

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        n, k, h = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = d * n * h * 2 + d * k * h * 2
        if self.attention_bias:
            attn += n * h + 2 * k * h + d
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_hidden_layers * per_layer + d + head

    # ---- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Reads both the transformers 4.x and 5.x spellings; refuses what we don't compute."""

        def refuse(field, value, why):
            raise UserError(f"{source}: unsupported {field}={value!r}: {why}.")

        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            refuse("model_type", model_type, "jaxtune supports Llama-family models ('llama') only")
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        if "LlamaForCausalLM" not in archs:
            refuse("architectures", archs, "only LlamaForCausalLM checkpoints can be loaded")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            refuse("hidden_act", act, "Llama uses 'silu' and no other activation is implemented")
        if d.get("quantization_config"):
            refuse("quantization_config", "...", "quantized checkpoints cannot be fine-tuned in full")
        if _convert(source, "attention_dropout", d.get("attention_dropout") or 0.0, float) != 0.0:
            refuse("attention_dropout", d["attention_dropout"], "attention dropout is not implemented")
        if _convert(source, "partial_rotary_factor", d.get("partial_rotary_factor") or 1.0, float) != 1.0:
            refuse("partial_rotary_factor", d["partial_rotary_factor"], "Llama rotates the whole head")

        rope_theta, scaling = _read_rope(d, refuse, source)
        eos = d.get("eos_token_id", 2)
        if not isinstance(eos, (list, tuple)):
            eos = () if eos is None else (_convert(source, "eos_token_id", eos, int),)
        eos = tuple(eos)

        def get(key, kind, default=_REQUIRED):
            return _convert(source, key, d[key] if default is _REQUIRED else d.get(key, default), kind)

        try:
            heads = get("num_attention_heads", int)
            kv_heads = get("num_key_value_heads", int) if d.get("num_key_value_heads") else heads
            head_dim = get("head_dim", int) if d.get("head_dim") else get("hidden_size", int) // heads
            return cls(
                vocab_size=get("vocab_size", int),
                hidden_size=get("hidden_size", int),
                intermediate_size=get("intermediate_size", int),
                num_hidden_layers=get("num_hidden_layers", int),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=get("rms_norm_eps", float, 1e-6),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                max_position_embeddings=get("max_position_embeddings", int, 2048),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                initializer_range=get("initializer_range", float, 0.02),
                bos_token_id=d.get("bos_token_id", 1),  # transformers' default when absent
                eos_token_id=eos,
                pad_token_id=d.get("pad_token_id"),
                dtype=d.get("dtype") or d.get("torch_dtype"),
            )
        except KeyError as e:
            raise UserError(f"{source}: missing required field {e.args[0]!r}.") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "LlamaConfig":
        check_local_dir(path, "model")
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise UserError(f"{path}: no config.json found; expected a Hugging Face model directory.")
        with open(file, "rb") as f:
            try:
                d = json.load(f)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise UserError(f"{file}: not valid JSON ({e}).") from None
        if not isinstance(d, dict):
            raise UserError(f"{file}: expected a JSON object, got a {type(d).__name__}.")
        return cls.from_hf_dict(d, source=file)

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in the transformers 5.x spelling, plus the 4.x rope keys for older readers."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        legacy_scaling = None
        if self.rope_scaling is not None:
            s = {k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if v is not None}
            rope.update(s)
            legacy_scaling = dict(s)
        eos = (self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)) or None
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "rope_scaling": legacy_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype or "float32",
        }


_REQUIRED = object()


def _convert(source: str, key: str, value, kind):
    """int(value) or float(value), or one sentence naming the field (a null or "4k" in a
    hand-edited config.json)."""
    if value is None or isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        ok = False
    else:
        try:
            value, ok = kind(value), True
        except (TypeError, ValueError):
            ok = False
    if not ok:
        raise UserError(f"{source}: {key}={value!r} is not {'an integer' if kind is int else 'a number'}.")
    return value


def _read_rope(d: dict[str, Any], refuse, source: str = "config.json") -> tuple[float, RopeScaling | None]:
    """RoPE settings resolved in transformers' order: `rope_scaling` (the 4.x spelling) wins
    over `rope_parameters` (5.x) when both are there, as in
    `RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`; a top-level `rope_theta` fills
    in a missing one, and a top-level `original_max_position_embeddings` overrides."""
    field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    raw = d.get(field) or {}
    if not isinstance(raw, dict):
        refuse(field, raw, "expected an object")
    params = dict(raw)
    for key in params:
        if key not in _ROPE_KEYS:
            refuse(f"{field}.{key}", params[key], "this RoPE parameter is not implemented")
    if _convert(source, f"{field}.partial_rotary_factor", params.get("partial_rotary_factor") or 1.0, float) != 1.0:
        refuse(f"{field}.partial_rotary_factor", params["partial_rotary_factor"], "Llama rotates the whole head")
    theta = _convert(source, "rope_theta", params.get("rope_theta", d.get("rope_theta", 10000.0)), float)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        refuse(f"{field}.rope_type", rope_type, f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    if "factor" not in params:
        refuse(f"{field}.factor", None, f"rope_type {rope_type!r} needs a factor")
    factor = _convert(source, f"{field}.factor", params["factor"], float)
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    for key in ("low_freq_factor", "high_freq_factor"):
        if key not in params:
            refuse(f"{field}.{key}", None, "rope_type 'llama3' needs it")
    if "original_max_position_embeddings" in d:  # Phi-3 style, and transformers gives it priority
        original = d["original_max_position_embeddings"]
    else:
        original = params.get("original_max_position_embeddings") or d.get("max_position_embeddings")
    if original is None:
        why = "rope_type 'llama3' needs it (or max_position_embeddings)"
        refuse(f"{field}.original_max_position_embeddings", None, why)
    return theta, RopeScaling(
        "llama3",
        factor,
        _convert(source, f"{field}.low_freq_factor", params["low_freq_factor"], float),
        _convert(source, f"{field}.high_freq_factor", params["high_freq_factor"], float),
        _convert(source, f"{field}.original_max_position_embeddings", original, int),
    )


# ---- RoPE ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies `[head_dim/2]` in float32, computed as transformers computes them."""
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return (inv_freq / np.float32(s.factor)).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old_len = s.original_max_position_embeddings
    low_wavelen = old_len / s.low_freq_factor
    high_wavelen = old_len / s.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(s.factor), inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B, T, head_dim]` in the `rotate_half` layout of transformers."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, heads, H]; cos/sin: [B, T, H]. Computed in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ---- Modules --------------------------------------------------------------------------------
def _dot(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """Einsum with inputs in `dtype` and float32 accumulation (fast bf16 on CPU, exact fp32)."""
    return product(spec, x.astype(dtype), w.astype(dtype))


class Projection(nnx.Module):
    """A linear map contracting the first `n_in` kernel axes, with an optional bias.

    The kernel keeps its named axes (e.g. [D, heads, H] so tensor parallelism splits
    heads); the product itself runs as one 2-D `dense` on flattened tokens.
    `row_parallel`: tensor parallelism splits the contracted axis (o_proj, down_proj), so
    each device's product is a partial sum that an all-reduce completes.
    """

    def __init__(self, kernel_shape, n_in: int = 1, bias: bool = False, row_parallel: bool = False, *,
                 std, param_dtype, rngs):
        init = jax.nn.initializers.normal(std)
        self.kernel = nnx.Param(init(rngs.params(), kernel_shape, param_dtype))
        self.n_in = n_in
        self.row_parallel = row_parallel
        self.bias = nnx.Param(jnp.zeros(kernel_shape[n_in:], param_dtype)) if bias else None

    def _result_dtype(self, compute_dtype):
        """float32 where the sum is not complete on one device: a bf16 partial product
        would be rounded, then reduced in bf16 (GPUs all-reduce bf16 as it is), then rounded
        again. Without a mesh to say there is no tensor parallelism, assume there may be."""
        if self.bias is not None:
            return jnp.float32
        if self.row_parallel:
            mesh = activation_mesh()
            if mesh is None or mesh.shape["tensor"] > 1:
                return jnp.float32
        return rounded_result_dtype(compute_dtype)

    def __call__(self, x: jax.Array, compute_dtype) -> jax.Array:
        """x: [M, *kernel_shape[:n_in]] -> [M, *kernel_shape[n_in:]] in compute_dtype.

        Products accumulate in float32 and are stored in compute_dtype (as torch autocast
        does): in bf16 that halves the memory traffic of everything between the matmuls.
        A bias is added to the float32 sum, so the result is rounded once either way.
        """
        w = self.kernel[...]
        in_shape, out_shape = w.shape[: self.n_in], w.shape[self.n_in:]
        k, n = math.prod(in_shape), math.prod(out_shape)
        y = dense(x.reshape(x.shape[0], k), w.reshape(k, n), compute_dtype,
                  self._result_dtype(compute_dtype)).reshape(x.shape[0], *out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(compute_dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(jnp.float32) * x


class Attention(nnx.Module):
    def __init__(self, c: LlamaConfig, *, param_dtype, compute_dtype, rngs):
        d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        kw = dict(bias=c.attention_bias, std=c.initializer_range, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Projection((d, n, h), **kw)  # md,dnh->mnh
        self.k_proj = Projection((d, k, h), **kw)  # md,dkh->mkh
        self.v_proj = Projection((d, k, h), **kw)  # md,dkh->mkh
        self.o_proj = Projection((n, h, d), n_in=2, row_parallel=True, **kw)  # mnh,nhd->md
        self.num_kv_heads, self.head_dim = k, h
        self.compute_dtype = compute_dtype

    def __call__(self, x, cos, sin, segment_ids):
        """x: [M, D] float32; segment_ids: [B, T]. Returns [M, D] float32."""
        b, t = cos.shape[:2]
        dt, k, h = self.compute_dtype, self.num_kv_heads, self.head_dim
        heads = (BATCH_AXES, None, "tensor", None)  # [B, T, heads, H]
        q = constrain(self.q_proj(x, dt).reshape(b, t, -1, h), *heads)
        key = constrain(self.k_proj(x, dt).reshape(b, t, k, h), *heads)
        value = constrain(self.v_proj(x, dt).reshape(b, t, k, h), *heads)
        q = apply_rope(q, cos, sin) * (h**-0.5)
        key = apply_rope(key, cos, sin)
        q = q.reshape(b, t, k, -1, h)  # GQA: query heads grouped under their kv head
        out = causal_attention(q, key, value, segment_ids, dt)
        return self.o_proj(out.reshape(b * t, -1, h), dt)


class MLP(nnx.Module):
    def __init__(self, c: LlamaConfig, *, param_dtype, compute_dtype, rngs):
        d, f = c.hidden_size, c.intermediate_size
        kw = dict(bias=c.mlp_bias, std=c.initializer_range, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Projection((d, f), **kw)  # md,df->mf
        self.up_proj = Projection((d, f), **kw)  # md,df->mf
        self.down_proj = Projection((f, d), row_parallel=True, **kw)  # mf,fd->md
        self.compute_dtype = compute_dtype

    def __call__(self, x):
        dt = self.compute_dtype
        gate, up = (constrain(p(x, dt), BATCH_AXES, "tensor") for p in (self.gate_proj, self.up_proj))
        return self.down_proj(swiglu(gate, up, dt), dt)


class DecoderLayer(nnx.Module):
    def __init__(self, c: LlamaConfig, *, param_dtype, compute_dtype, rngs):
        kw = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(c, **kw)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(c, **kw)

    def __call__(self, x, cos, sin, segment_ids):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


def _check_ids(input_ids, vocab_size: int) -> None:
    """Out-of-range ids where they are known (an eager call; training checks its data before
    the first step): the embedding lookup would give NaN rows for an id past the vocabulary,
    and wrap -1 to the last row, where torch raises."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    if isinstance(input_ids, jax.Array) and not input_ids.is_fully_addressable:
        return  # spread over hosts: this one cannot read the others' ids
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise UserError(f"input_ids must be in [0, {vocab_size}) (the model's vocab_size), got {int(bad[0])}.")


class Llama(nnx.Module):
    """`LlamaForCausalLM`: `model(input_ids)` returns float32 logits `[B, T, vocab]`.

    `positions` (default `arange(T)`) drive RoPE and `segment_ids` (default all ones)
    restrict attention to tokens of the same segment, so packed samples run as if alone.
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        param_dtype=jnp.float32,
        compute_dtype=None,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise UserError(f"unknown remat policy {remat!r}; choose one of {', '.join(REMAT_POLICIES)}.")
        param_dtype = jnp.dtype(param_dtype)
        compute_dtype = jnp.dtype(compute_dtype or param_dtype)
        self.config = config
        self.remat = remat
        self.compute_dtype = compute_dtype
        c = config
        self.embed_tokens = nnx.Param(
            jax.nn.initializers.normal(c.initializer_range)(
                rngs.params(), (c.vocab_size, c.hidden_size), param_dtype
            )
        )

        @nnx.split_rngs(splits=c.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def make_layers(rngs):
            return DecoderLayer(c, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Projection(  # md,dv->mv
                (c.hidden_size, c.vocab_size), std=c.initializer_range, param_dtype=param_dtype, rngs=rngs,
            )
        else:
            self.lm_head = None

    def lm_head_kernel(self) -> jax.Array:
        """The output projection `[D, vocab]` (the transposed embedding when tied)."""
        if self.lm_head is None:
            return self.embed_tokens[...].T
        return self.lm_head.kernel[...]

    def lm_head_is_tied(self) -> bool:
        return self.lm_head is None

    def hidden_states(self, input_ids, positions=None, segment_ids=None) -> jax.Array:
        """Final-normalised hidden states `[B, T, D]` in float32 (the lm head's input)."""
        b, t = input_ids.shape
        _check_ids(input_ids, self.config.vocab_size)
        # [T] or [1, T] as well, as transformers' position_ids
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) if positions is None else positions, (b, t))
        segment_ids = jnp.broadcast_to(1 if segment_ids is None else segment_ids, (b, t)).astype(jnp.int32)
        cos, sin = rope_cos_sin(self.config, positions)

        x = jnp.take(self.embed_tokens[...], input_ids.reshape(-1), axis=0).astype(jnp.float32)
        x = constrain(x, BATCH_AXES, None)  # tokens split like the batch, not D like the embedding
        graphdef, layer_state = nnx.split(self.layers)

        def body(carry, state):
            out = nnx.merge(graphdef, state)(constrain(carry, BATCH_AXES, None), cos, sin, segment_ids)
            return constrain(out, BATCH_AXES, None), None

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, layer_state)
        return constrain(self.norm(x).reshape(b, t, -1), BATCH_AXES, None, None)

    def __call__(self, input_ids, positions=None, segment_ids=None) -> jax.Array:
        h = self.hidden_states(input_ids, positions, segment_ids)
        b, t, d = h.shape
        logits = _dot("md,dv->mv", h.reshape(b * t, d), self.lm_head_kernel(), self.compute_dtype)
        return logits.reshape(b, t, -1)
