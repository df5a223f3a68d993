"""The products as GPUs and TPUs get them: no CPU-only transposed copies, same numbers,
and float32 compute that is float32 on every backend.

There is no accelerator here, so the accelerator path runs on CPU with
`matmul.cpu_layouts` patched to False: what differs is only how operands are laid out.
"""

import json

import jax
import numpy as np
import pytest

from jaxtune import sharding
from jaxtune.models import matmul
from helpers import make_hf_llama
from train_helpers import Trainer, synthetic_rows


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_llama(path, num_key_value_heads=2, tie_word_embeddings=request.param)
    return path


def _train(path, rows, **kw):
    trainer = Trainer(path, sharding.MeshShape(1, 1, 1), **kw)
    metrics = [trainer.step(rows) for _ in range(3)]
    losses = [(float(m["loss"]), float(m["grad_norm"])) for m in metrics]
    text = trainer.lowered(rows).as_text()
    return losses, trainer.params(), text


@pytest.mark.parametrize("compute_dtype, chunk", [("float32", 0), ("bfloat16", 0), ("bfloat16", 16)])
def test_accelerator_layouts_train_the_same_numbers_without_copies(ckpt, monkeypatch, compute_dtype, chunk):
    rows = synthetic_rows(4, 32, seed=5)
    cpu_losses, cpu_params, cpu_text = _train(ckpt, rows, compute_dtype=compute_dtype, chunk=chunk)
    monkeypatch.setattr(matmul, "cpu_layouts", lambda: False)
    losses, params, text = _train(ckpt, rows, compute_dtype=compute_dtype, chunk=chunk)
    # Losses and gradient norms of three steps; only the order of float32 sums differs, and with
    # tied embeddings in bf16 the lm head's kernel gradient, which on CPU is made from float32
    # inputs (losses.py), so one bf16 rounding (2**-8 = 3.9e-3) apart: 1.6e-3 seen on an AVX2 CPU.
    tied = json.loads((ckpt / "config.json").read_text())["tie_word_embeddings"]
    rtol = 1e-6 if compute_dtype == "float32" else (4e-3 if tied else 1e-3)
    np.testing.assert_allclose(losses, cpu_losses, rtol=rtol)
    if compute_dtype == "float32":  # (in bf16, Adam turns rounding in near-zero gradients into lr-sized steps)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(cpu_params)):
            np.testing.assert_allclose(a, b, atol=1e-5)
    # The CPU path's transposed copies (behind optimization barriers) are gone.
    if compute_dtype == "bfloat16":
        assert "optimization_barrier" in cpu_text
    assert "optimization_barrier" not in text


def _dot_precisions(text):
    import re

    dots = re.findall(r"stablehlo\.dot_general.*", text)
    assert dots
    return {("HIGHEST" if "HIGHEST" in d else "DEFAULT") for d in dots}


def test_float32_compute_is_float32_on_every_backend(ckpt):
    """TPUs would run a default-precision float32 product as one bf16 pass, recent GPUs as
    TF32: every float32 product asks for HIGHEST; bf16 compute keeps the default."""
    rows = synthetic_rows(4, 32, seed=5)
    *_, fp32_text = _train(ckpt, rows, compute_dtype="float32")
    *_, bf16_text = _train(ckpt, rows, compute_dtype="bfloat16")
    assert _dot_precisions(fp32_text) == {"HIGHEST"}
    assert "DEFAULT" in _dot_precisions(bf16_text)


def test_layouts_follow_the_devices_a_step_is_traced_for(monkeypatch):
    """A GPU host can train on a mesh of its CPU devices: XLA:CPU then needs the CPU layouts
    (the tied-embedding product would otherwise be one XLA:CPU cannot run)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not matmul.cpu_layouts()
    with sharding.activations_on(sharding.make_mesh(sharding.MeshShape(1, 2, 1), devices=jax.devices()[:2])):
        assert matmul.cpu_layouts()
