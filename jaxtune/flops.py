"""Model FLOPs per token and the peak a device can do, for MFU.

Model FLOPs (what the README documents): per trained-or-not token in a row,
  6 * N_matmul                                  (forward 2N, backward 4N)
+ 6 * L * T * n_heads * head_dim                (attention scores and values, causal:
                                                 half of the 12 * L * T * d of full attention)
N_matmul counts every weight used in a matmul: attention and MLP projections and the lm
head (the embedding lookup is not a matmul). Rematerialisation is not counted (that would
be hardware FLOPs utilisation). MFU = tokens/s per device * FLOPs per token / peak.
"""

from __future__ import annotations

import re

import jax

from jaxtune.models.llama import LlamaConfig

# Dense bf16/fp16 peak FLOP/s per device (no sparsity), by a name in jax's `device_kind`
# (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "TPU v5 lite"). The first name that
# appears as a whole word wins, so the variants come before their family's name.
PEAK_BF16 = (
    ("GH200", 989e12),  # Grace Hopper: an H100/H200-class GPU
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("TPU v6e", 918e12),
    ("TPU v6", 918e12),  # v6e ("TPU v6 lite")
    ("TPU v5p", 459e12),
    ("TPU v5e", 197e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5", 459e12),  # what jax reports for a v5p chip (as jax's own Pallas TPU table reads it)
    ("TPU v4 lite", 138e12),  # v4i, the inference chip
    ("TPU v4", 275e12),
)


def peak_for_device_kind(kind: str) -> float | None:
    for name, peak in PEAK_BF16:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", kind, re.IGNORECASE):
            return peak
    return None


def matmul_params(c: LlamaConfig) -> int:
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f
    return c.num_hidden_layers * per_layer + d * v


def flops_per_token(c: LlamaConfig, seq_len: int) -> float:
    attention = 6 * c.num_hidden_layers * seq_len * c.num_attention_heads * c.head_dim
    return 6 * matmul_params(c) + attention


def peak_flops_per_device(compute_dtype: str, configured: float = 0.0) -> float | None:
    """The configured peak, else the bf16 table for this device kind; None when unknown."""
    if configured > 0:
        return configured
    if compute_dtype == "float32":
        return None  # fp32 peaks depend on TF32 settings; give logging.peak_flops
    return peak_for_device_kind(jax.devices()[0].device_kind)
