"""Packing: deterministic layout, segment-local targets and positions, and the same loss as alone."""

import random

import numpy as np
import pytest
from data_helpers import VOCAB_SIZE, WORDS, llama3_dir, plain_dir, settings, write_jsonl  # noqa: F401
from helpers import make_hf_llama

from jaxtune.data import Rows, load_tokenizer, prepare_datasets
from jaxtune.data.packing import best_fit_decreasing, pack
from jaxtune.data.records import Location
from jaxtune.data.tokenize import TokenizedSample


def test_best_fit_decreasing_layout():
    # Longest first, each into the fullest row it fits: 8 | 6 | 5, then 3 -> the row with 4 left,
    # 2 -> the row with 2 left, 1 -> the row with 1 left.
    assert best_fit_decreasing([5, 3, 8, 2, 6, 1], 10) == [[2, 3], [4, 1, 5], [0]]
    assert best_fit_decreasing([4, 4, 4], 4) == [[0], [1], [2]]
    assert best_fit_decreasing([], 4) == []


def test_pack_fills_rows_with_segment_local_targets():
    def sample(ids, mask):
        return TokenizedSample(Location("x"), np.array(ids, np.int32), np.array(mask, bool))

    samples = [sample([10, 11, 12], [0, 1, 1]), sample([20, 21, 22, 23, 24], [0, 0, 1, 1, 1]), sample([30, 31], [0, 1])]
    rows = pack(samples, 8, packing=True)
    # Lengths 3, 5, 2 -> [sample 1, sample 0] (8 tokens), [sample 2].
    np.testing.assert_array_equal(rows.input_ids, [[20, 21, 22, 23, 24, 10, 11, 12], [30, 31, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows.positions, [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 0, 0, 0, 0, 0]])
    # The last token of a segment predicts nothing (not the next sample's first token).
    np.testing.assert_array_equal(rows.targets, [[21, 22, 23, 24, 0, 11, 12, 0], [31, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows.loss_weights, [[0, 1, 1, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
    assert rows.loss_weights.dtype == np.float32 and rows.input_ids.dtype == np.int32
    assert rows.num_trained_tokens == 6 and rows.num_tokens == 10

    unpacked = pack(samples, 8, packing=False)
    assert len(unpacked) == 3
    np.testing.assert_array_equal(unpacked.input_ids[0], [10, 11, 12, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(unpacked.loss_weights[0], [1, 1, 0, 0, 0, 0, 0, 0])


def test_rows_indexing_and_padding():
    rows = Rows.padding(3, 4)
    rows.input_ids[:] = np.arange(12).reshape(3, 4)
    assert rows[1].input_ids.tolist() == [[4, 5, 6, 7]]
    assert rows[-1].input_ids.tolist() == [[8, 9, 10, 11]]
    assert rows[np.array([2, 0])].input_ids[:, 0].tolist() == [8, 0]
    assert len(rows[1:]) == 2
    assert rows.num_trained_tokens == 0 and not rows.segment_ids.any()


def _texts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(n)]


def test_packed_loss_equals_samples_run_alone(tmp_path, plain_dir):
    import jax
    import jax.numpy as jnp

    import jaxtune

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in _texts(12)])
    tok = load_tokenizer(plain_dir)
    rows = prepare_datasets(settings(data, plain_dir, max_seq_len=48), tok, log=lambda m: None).train
    alone = prepare_datasets(settings(data, plain_dir, max_seq_len=48, packing=False), tok, log=lambda m: None).train
    assert len(rows) < len(alone) == 12 and rows.segment_ids.max() >= 3  # really packed

    make_hf_llama(tmp_path / "model", vocab_size=VOCAB_SIZE)
    model = jaxtune.from_pretrained(tmp_path / "model")

    def token_losses(ids, targets, weights, positions=None, segments=None):
        logits = model(jnp.asarray(ids), None if positions is None else jnp.asarray(positions),
                       None if segments is None else jnp.asarray(segments))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
        return np.asarray(nll * jnp.asarray(weights))

    packed = token_losses(rows.input_ids, rows.targets, rows.loss_weights, rows.positions, rows.segment_ids)
    per_segment = {}
    for r in range(len(rows)):
        for s in set(rows.segment_ids[r].tolist()) - {0}:
            sel = rows.segment_ids[r] == s
            per_segment[tuple(rows.input_ids[r][sel])] = packed[r][sel].sum()

    # Alone: one sample per row from position 0, default positions and segments; the padding
    # after it is invisible to its tokens (causal attention), so each runs exactly as alone.
    solo = token_losses(alone.input_ids, alone.targets, alone.loss_weights)
    for r in range(len(alone)):
        n = int(alone.segment_ids[r].sum())
        np.testing.assert_allclose(per_segment[tuple(alone.input_ids[r, :n])], solo[r].sum(), rtol=1e-5)
    total_alone, trained_alone = solo.sum(), alone.num_trained_tokens
    n = int(alone.segment_ids[0].sum())  # and one sample with no padding at all
    exact = token_losses(alone.input_ids[:1, :n], alone.targets[:1, :n], alone.loss_weights[:1, :n])
    np.testing.assert_allclose(exact.sum(), solo[0].sum(), rtol=1e-5)

    assert trained_alone == rows.num_trained_tokens
    packed_mean = packed.sum() / rows.num_trained_tokens
    np.testing.assert_allclose(packed_mean, total_alone / trained_alone, rtol=1e-5)

    # Control: without segment ids and per-segment positions, packed samples see each other.
    leaky = token_losses(rows.input_ids, rows.targets, rows.loss_weights)
    assert abs(leaky.sum() / rows.num_trained_tokens - packed_mean) > 1e-3


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_too_long_samples(tmp_path, plain_dir, truncation):
    tok = load_tokenizer(plain_dir)
    long_text = " ".join(WORDS[:40])
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": long_text}, {"text": "hello world"}])
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": long_text, "completion": "the answer"}])
    got = prepare_datasets(settings([texts, pairs], plain_dir, max_seq_len=16, truncation=truncation),
                           tok, log=lambda m: None)
    s = got.report.train
    n_long = len(tok(long_text)["input_ids"]) + 1
    assert n_long > 16
    if truncation == "truncate":
        # The text keeps its first 16 tokens (all trained); the prompt_completion sample keeps only
        # prompt tokens, so it has nothing left to train and is dropped.
        assert (s.truncated, s.dropped_too_long, s.dropped_no_trained_tokens, s.samples) == (2, 0, 1, 2)
        expected = tok(long_text)["input_ids"][:16]
        first = [r for r in range(len(got.train)) if got.train.input_ids[r, 0] == expected[0]
                 and got.train.input_ids[r, :16].tolist() == expected]
        assert first, "the truncated sample keeps its first max_seq_len tokens"
    else:
        assert (s.truncated, s.dropped_too_long, s.dropped_no_trained_tokens, s.samples) == (0, 2, 0, 1)
