"""Each device computes its own share of the batch (and, with tensor parallelism, of the heads).

Left to propagation, the residual stream took the embedding's layout ([V, D] split over
fsdp on D): on fsdp=8 every device ran every projection over all tokens of the batch on a
slice of D, and all-reduced full-size activations. Tensor parallelism was undone inside
attention, where every device computed every head. The numbers were right either way
(`test_same_losses_on_every_mesh`); only the per-device work shows it.
"""

import re

import pytest

from jaxtune import sharding
from helpers import make_hf_llama
from train_helpers import Trainer, synthetic_rows

ROWS, SEQ, KV_HEADS, HEADS, HEAD_DIM = 16, 32, 2, 4, 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    # Token counts here are multiples of 64 (512 tokens, 64-256 per device); no weight dimension
    # (48, 24, 12, 96, 48, 160, 80) is, so a product's row count tells tokens from weights.
    make_hf_llama(path, num_key_value_heads=KV_HEADS, num_attention_heads=HEADS, hidden_size=HEADS * HEAD_DIM,
                  intermediate_size=96, vocab_size=160)
    return path


def _compiled_dots(trainer):
    hlo = trainer.lowered(synthetic_rows(ROWS, SEQ, vocab=160)).compile().as_text()
    return [tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"= f32\[([\d,]+)\]\S* dot\(", hlo)]


@pytest.mark.parametrize("mesh", [sharding.MeshShape(1, 8, 1), sharding.MeshShape(1, 4, 2),
                                  sharding.MeshShape(2, 2, 2), sharding.MeshShape(8, 1, 1)])
def test_every_device_computes_only_its_share_of_the_batch_and_heads(ckpt, mesh):
    trainer = Trainer(ckpt, mesh)
    dp, tp = sharding.data_parallel_size(trainer.mesh), trainer.mesh.shape["tensor"]
    dots = _compiled_dots(trainer)
    tokens = ROWS * SEQ
    projections = [d for d in dots if len(d) == 2]
    token_rows = {d[0] for d in projections if d[0] % 64 == 0}
    assert token_rows == {tokens // dp}, f"projections over {sorted(token_rows)} tokens on {mesh}"
    # Attention's batched products run over [B*K (this device's), queries, keys or head_dim].
    attention = {d[0] for d in dots if len(d) == 3}
    assert attention == {ROWS * KV_HEADS // (dp * tp)}, f"attention over {sorted(attention)} (batch x head) on {mesh}"
    # The q projection's output is split over the heads: N*H / tp columns per device.
    assert (tokens // dp, HEADS * HEAD_DIM // tp) in projections


def test_fsdp_activation_memory_is_the_data_parallel_one(ckpt):
    """fsdp=8 shards parameters on top of what data=8 does; its activations are the same
    per-device share, so its temp memory must not exceed data=8's (it was 2.3x)."""
    def temp(mesh):
        lowered = Trainer(ckpt, mesh).lowered(synthetic_rows(ROWS, SEQ, vocab=160))
        return lowered.compile().memory_analysis().temp_size_in_bytes

    assert temp(sharding.MeshShape(1, 8, 1)) <= temp(sharding.MeshShape(8, 1, 1))


@pytest.mark.parametrize("mesh", [sharding.MeshShape(1, 4, 2), sharding.MeshShape(2, 2, 2), sharding.MeshShape(1, 1, 2)])
def test_tensor_parallel_attention_exchanges_no_activations_on_accelerators(ckpt, mesh, monkeypatch):
    """On GPUs and TPUs attention keeps batch and heads as two axes, split as the projections
    left them. Merged into one [B*K] axis, a device's share of it was other rows and heads
    than it held whenever a data-parallel group had several rows: all-to-alls of q, k, v and
    their gradients in every layer (41 per step on the Llama 3 8B shapes at tensor=8)."""
    from jaxtune.models import matmul

    monkeypatch.setattr(matmul, "cpu_layouts", lambda: False)
    trainer = Trainer(ckpt, mesh)
    hlo = trainer.lowered(synthetic_rows(ROWS, SEQ, vocab=160)).compile().as_text()
    in_layers = [line for line in hlo.splitlines() if " all-to-all(" in line and "/while/body/" in line]
    assert not in_layers, in_layers[:2]  # (the embedding lookup's gather has its own, once a step)
    dp, tp = sharding.data_parallel_size(trainer.mesh), trainer.mesh.shape["tensor"]
    batched = {int(dims.split(",")[0]) for dims in re.findall(r"= f32\[([\d,]+)\]\S* dot\(", hlo)
               if dims.count(",") >= 2}  # XLA merges the [rows, kv heads] batch axes of each device
    assert batched == {ROWS * KV_HEADS // (dp * tp)}, batched

