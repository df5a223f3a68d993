"""Tiny random Llama checkpoints made with transformers, inside the tests (no hub)."""

from __future__ import annotations

import json
import os

import numpy as np

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
)


def make_hf_llama(path, seed: int = 0, safe_serialization: bool = True, max_shard_size=None, **overrides):
    """Saves a random `LlamaForCausalLM` to `path`; returns the torch model (eval mode)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    kwargs = {"safe_serialization": safe_serialization}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(file, "w") as f:
        json.dump(cfg, f)
    return cfg


def assert_close_scaled(ours, ref, tol=1e-4):
    err = np.max(np.abs(np.asarray(ours) - ref))
    scale = np.max(np.abs(ref))
    assert err <= tol * scale, f"max |diff| {err:.3g} > {tol} x scale {scale:.3g}"
