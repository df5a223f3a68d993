"""The tokenized-data cache: hits without tokenizing, misses when anything that shapes rows changes."""

import os

import pytest
from data_helpers import llama3_dir, make_tokenizer, settings, write_jsonl  # noqa: F401

from jaxtune.data import load_tokenizer, prepare_datasets
from jaxtune.data.tokenize import SampleEncoder

CHATS = [
    {"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "world " * (i + 1)}]}
    for i in range(6)
]


@pytest.fixture
def tokenize_calls(monkeypatch):
    calls = []
    original = SampleEncoder.tokenize

    def counting(self, samples, plans):
        calls.append(len(samples))
        return original(self, samples, plans)

    monkeypatch.setattr(SampleEncoder, "tokenize", counting)
    return calls


def prepare(s, tok_dir, **kw):
    log = []
    got = prepare_datasets(s, load_tokenizer(tok_dir), log=log.append, **kw)
    return got, " ".join(log)


def test_second_call_hits_the_cache(tmp_path, llama3_dir, tokenize_calls):
    data = write_jsonl(tmp_path / "d.jsonl", CHATS)
    s = settings(data, llama3_dir, cache_dir=str(tmp_path / "cache"), eval_fraction=0.3)
    first, log = prepare(s, llama3_dir)
    assert "cache miss" in log and not first.report.cache_hit
    assert tokenize_calls == [4, 2]  # train and eval were tokenized

    second, log = prepare(s, llama3_dir)
    assert "cache hit" in log and second.report.cache_hit
    assert tokenize_calls == [4, 2]  # nothing tokenized again
    assert second.train.equals(first.train) and second.eval.equals(first.eval)
    assert second.report.to_json() == {**first.report.to_json(), "cache_hit": True}
    assert [n for n in os.listdir(tmp_path / "cache") if n.startswith(".")] == []  # no temp dirs left


def test_changes_miss_the_cache(tmp_path, llama3_dir, tokenize_calls):
    data = write_jsonl(tmp_path / "d.jsonl", CHATS)
    cache_dir = str(tmp_path / "cache")
    base = settings(data, llama3_dir, cache_dir=cache_dir)
    prepare(base, llama3_dir)

    _, log = prepare(settings(data, llama3_dir, cache_dir=cache_dir, max_seq_len=32), llama3_dir)
    assert "cache miss" in log
    _, log = prepare(settings(data, llama3_dir, cache_dir=cache_dir, train_on_prompt=True), llama3_dir)
    assert "cache miss" in log
    _, log = prepare(base, llama3_dir, process_index=1, process_count=2)
    assert "cache miss" in log

    other_tok = tmp_path / "tok_chatml"
    make_tokenizer(other_tok, "chatml", generation_eos=("<|end_of_text|>", "<|eot_id|>"))
    _, log = prepare(settings(data, str(other_tok), cache_dir=cache_dir), str(other_tok))
    assert "cache miss" in log

    _, log = prepare(base, llama3_dir)
    assert "cache hit" in log
    write_jsonl(data, CHATS[:5])  # the data file changed
    changed, log = prepare(base, llama3_dir)
    assert "cache miss" in log and changed.report.train.records == 5
    _, log = prepare(base, llama3_dir)
    assert "cache hit" in log
    assert len(os.listdir(cache_dir)) == 6  # one entry per distinct input


def test_no_cache_dir_writes_nothing(tmp_path, llama3_dir):
    data = write_jsonl(tmp_path / "d.jsonl", CHATS)
    before = sorted(os.listdir(tmp_path))
    _, log = prepare(settings(data, llama3_dir, cache_dir=""), llama3_dir)
    assert "cache" not in log and sorted(os.listdir(tmp_path)) == before


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path, llama3_dir):
    """A read-only or unusable cache directory (a shared cache, a full disk) costs the next run
    its tokenizing, not this run: the data is used, with a warning."""
    data = write_jsonl(tmp_path / "d.jsonl", CHATS)
    (tmp_path / "a_file").write_text("")
    uncached, log = prepare(settings(data, llama3_dir, cache_dir=str(tmp_path / "a_file" / "cache")), llama3_dir)
    assert "warning: could not write the data cache" in log and "continuing without it" in log
    reference, _ = prepare(settings(data, llama3_dir, cache_dir=""), llama3_dir)
    assert uncached.train.equals(reference.train)


@pytest.mark.parametrize("damage", ["zero_length", "half", "garbage", "eval_missing"])
def test_an_entry_damaged_in_any_way_is_rebuilt(tmp_path, llama3_dir, damage):
    data = write_jsonl(tmp_path / "d.jsonl", CHATS)
    s = settings(data, llama3_dir, cache_dir=str(tmp_path / "cache"), eval_fraction=0.3)
    first, _ = prepare(s, llama3_dir)
    (entry,) = os.listdir(tmp_path / "cache")
    if damage == "eval_missing":  # was a hit with no eval rows: the run skipped evaluation
        os.remove(tmp_path / "cache" / entry / "eval.npz")
    else:
        npz = tmp_path / "cache" / entry / "train.npz"
        content = npz.read_bytes()
        npz.write_bytes({"zero_length": b"", "half": content[: len(content) // 2], "garbage": b"truncated"}[damage])
    again, log = prepare(s, llama3_dir)
    assert "cache miss" in log and again.train.equals(first.train) and again.eval.equals(first.eval)
    third, log = prepare(s, llama3_dir)
    assert "cache hit" in log and third.train.equals(first.train) and third.eval.equals(first.eval)


def test_runs_sharing_a_cache_can_write_the_same_entry_at_once(tmp_path):
    """A sweep started at once: every run misses and saves the same key; all must succeed."""
    import threading

    from jaxtune.data import cache
    from jaxtune.data.rows import Rows

    rows = Rows.padding(2000, 256)  # a few MB, so that the writes overlap
    errors = []
    for trial in range(8):
        cache_dir = str(tmp_path / f"cache{trial}")
        barrier = threading.Barrier(4)

        def write():
            barrier.wait()
            try:
                cache.save(cache_dir, "k" * 32, {}, rows, None, {"trial": 1})
            except Exception as e:  # noqa: BLE001 - collected for the assertion
                errors.append(repr(e))

        threads = [threading.Thread(target=write) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        loaded = cache.load(cache_dir, "k" * 32)
        assert loaded is not None and loaded[0].equals(rows)
        assert os.listdir(cache_dir) == ["k" * 32]  # no temporary or set-aside copies left
    assert errors == []


def test_a_killed_runs_temporary_directories_are_deleted_a_day_later(tmp_path):
    import time

    from jaxtune.data import cache
    from jaxtune.data.rows import Rows

    cache_dir = tmp_path / "cache"
    (cache_dir / "complete").mkdir(parents=True)
    day = 24 * 3600
    for name, age in ((".a.x1.tmp", 2 * day), ("b.c2.trash", 2 * day), (".d.x3.tmp", 60), ("old_entry", 2 * day)):
        (cache_dir / name).mkdir()
        (cache_dir / name / "train.npz").write_bytes(b"partial")
        os.utime(cache_dir / name, (time.time() - age,) * 2)
    cache.save(str(cache_dir), "k" * 32, {}, Rows.padding(2, 8), None, {})
    # a recent .tmp may be another run's write in progress; entries are never touched
    assert sorted(os.listdir(cache_dir)) == sorted([".d.x3.tmp", "complete", "old_entry", "k" * 32])
