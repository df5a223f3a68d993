"""Loader: resume equals uninterrupted, a new order per epoch, per-process slices, eval batches."""

import numpy as np
import pytest
from data_helpers import WORDS, plain_dir, settings, write_jsonl  # noqa: F401

from jaxtune.data import BatchLoader, LoaderPosition, Rows, iter_eval_batches, load_tokenizer, prepare_datasets
from jaxtune.data.loader import too_few_rows
from jaxtune.errors import UserError


def numbered_rows(n, seq_len=4):
    rows = Rows.padding(n, seq_len)
    rows.input_ids[:] = np.arange(n)[:, None]  # row r holds r
    rows.segment_ids[:] = 1
    return rows


def ids(batch):
    return batch.input_ids[:, 0].tolist()


def test_resumed_loader_continues_exactly(tmp_path):
    rows = numbered_rows(10)
    loader = BatchLoader(rows, batch_size=3, seed=7)
    assert loader.steps_per_epoch == 3
    uninterrupted, positions = [], []
    for _ in range(8):  # crosses two epoch boundaries
        positions.append(loader.position)
        uninterrupted.append(ids(loader.next_batch()))
    assert positions[:5] == [LoaderPosition(0, 0), LoaderPosition(0, 1), LoaderPosition(0, 2),
                             LoaderPosition(1, 0), LoaderPosition(1, 1)]
    for k, position in enumerate(positions):
        resumed = BatchLoader(rows, batch_size=3, seed=7, position=position)
        assert [ids(resumed.next_batch()) for _ in range(8 - k)] == uninterrupted[k:]
        assigned = BatchLoader(rows, batch_size=3, seed=7)
        assigned.position = position  # as a trainer restoring its state does
        assert [ids(assigned.next_batch()) for _ in range(8 - k)] == uninterrupted[k:]


def test_each_epoch_is_a_new_permutation():
    rows = numbered_rows(12)
    loader = BatchLoader(rows, batch_size=4, seed=0)
    epochs = [sum((ids(loader.next_batch()) for _ in range(3)), []) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(12))  # every row once per epoch
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    assert BatchLoader(rows, batch_size=4, seed=1).next_batch().input_ids[:, 0].tolist() != epochs[0][:4]


def test_usable_rows_and_partial_batches():
    rows = numbered_rows(10)
    loader = BatchLoader(rows, batch_size=4, seed=3, usable_rows=9)  # another process has only 9 rows
    assert loader.steps_per_epoch == 2  # 9 // 4: the partial batch is dropped
    seen = [ids(loader.next_batch()) for _ in range(2)]
    assert loader.position == LoaderPosition(1, 0)
    assert len(set(sum(seen, []))) == 8


def test_loader_errors():
    with pytest.raises(UserError, match="fewer than one batch of 8 rows"):
        BatchLoader(numbered_rows(5), batch_size=8, seed=0)
    # training's own sentence; one process's view is in test_data_check
    assert too_few_rows(3, 8, 2, packing=False) == (
        "the training data has 3 rows on the process with the fewest of the 2, fewer than one batch of 4 rows "
        "(train.global_batch_size=8 over 2 processes); add data or lower train.global_batch_size.")
    with pytest.raises(UserError, match="saved data position"):
        BatchLoader(numbered_rows(5), batch_size=2, seed=0, position=LoaderPosition(0, 2))
    loader = BatchLoader(numbered_rows(5), batch_size=2, seed=0)
    with pytest.raises(UserError, match=r"epoch 3, batch 5\) does not fit this data \(2 batches per epoch\)"):
        loader.position = LoaderPosition(3, 5)  # resuming by assignment is checked too


def test_eval_batches_cover_every_row_once_and_pad():
    rows = numbered_rows(5)
    rows.loss_weights[:] = 1.0
    batches = list(iter_eval_batches(rows, batch_size=2))
    assert [b.input_ids[:, 0].tolist() for b in batches] == [[0, 1], [2, 3], [4, 0]]
    assert batches[-1].segment_ids[1].sum() == 0 and batches[-1].loss_weights[1].sum() == 0
    padded = list(iter_eval_batches(rows, batch_size=2, num_batches=5))
    assert len(padded) == 5 and all(b.num_trained_tokens == 0 for b in padded[3:])
    assert sum(b.num_trained_tokens for b in padded) == rows.num_trained_tokens
    assert [len(b) for b in iter_eval_batches(Rows.padding(0, 4), 2, num_batches=2)] == [2, 2]


def _unique_texts(n):
    return [f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} {i}" for i in range(n)]


def _texts_of(rows, tok):
    out = []
    for r in range(len(rows)):
        n = int(np.count_nonzero(rows.segment_ids[r]))
        out.append(tok.decode(rows.input_ids[r, :n].tolist(), skip_special_tokens=True))
    return out


def test_four_processes_get_disjoint_slices_that_cover_the_data(tmp_path, plain_dir):
    texts = _unique_texts(23)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    tok = load_tokenizer(plain_dir)
    per_process = []
    for p in range(4):
        got = prepare_datasets(settings(data, plain_dir, packing=False), tok, process_index=p, process_count=4,
                               log=lambda m: None)
        assert got.report.train.records == len(range(p, 23, 4))
        per_process.append(_texts_of(got.train, tok))
    for p in range(4):
        assert per_process[p] == texts[p::4]  # record i belongs to process i % 4, in order
    assert sorted(sum(per_process, [])) == sorted(texts)


def test_held_out_eval_is_disjoint_from_train_on_every_process(tmp_path, plain_dir):
    texts = _unique_texts(40)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    tok = load_tokenizer(plain_dir)
    train, evals = [], []
    for p in range(2):
        got = prepare_datasets(settings(data, plain_dir, packing=False, eval_fraction=0.25, seed=5), tok,
                               process_index=p, process_count=2, log=lambda m: None)
        train += _texts_of(got.train, tok)
        evals += _texts_of(got.eval, tok)
    assert len(evals) == 10 and len(train) == 30
    assert sorted(train + evals) == sorted(texts)
    again = prepare_datasets(settings(data, plain_dir, packing=False, eval_fraction=0.25, seed=5), tok,
                             log=lambda m: None)
    assert sorted(_texts_of(again.eval, tok)) == sorted(evals)  # the hold-out does not depend on the process count
    other_seed = prepare_datasets(settings(data, plain_dir, packing=False, eval_fraction=0.25, seed=6), tok,
                                  log=lambda m: None)
    assert sorted(_texts_of(other_seed.eval, tok)) != sorted(evals)


def test_the_agreement_on_bad_records_keeps_one_process_messages_whole():
    """Messages cross processes as fixed-size byte arrays; the process's own is not cut to that
    size, and a summary whose skipped records were all in other shares has no empty "e.g."."""
    from jaxtune.data.pipeline import _FirstBad, check_not_all_dropped
    from jaxtune.data.report import DataReport, SplitStats

    report = DataReport(64, True, 0, 1, "none", train=SplitStats(records=3, samples=3))
    long = "data.jsonl:7: " + "x" * 5000
    with pytest.raises(UserError) as refused:
        check_not_all_dropped(report, settings=None, first_bad=_FirstBad(0, 6, long))
    assert str(refused.value) == long
    report.bad_records_elsewhere = 2  # another process's cache held them, without an example
    assert "skipped 2 bad record(s) (2 in other processes' shares)\n" in report.summary() + "\n"
