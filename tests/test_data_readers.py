"""Every file kind gives the same samples as JSONL; globs, several files, save_to_disk directories."""

import csv
import json
import os

import pytest
from data_helpers import llama3_dir, settings, trained_segments, write_jsonl  # noqa: F401

from jaxtune.data import load_tokenizer, prepare_datasets
from jaxtune.data.readers import SourceFile, resolve_files
from jaxtune.data.records import BadRecord
from jaxtune.errors import UserError

ALPACA = [
    {"instruction": "translate into french", "input": "the cat", "output": "le chat"},
    {"instruction": "say hello", "input": "", "output": "hello world"},
    {"instruction": "capital of france?", "input": "", "output": "paris"},
]
CHATS = [
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two plus four"},
                  {"role": "assistant", "content": "six"}]},
]


def rows_of(files, tok_dir, **kw):
    tok = load_tokenizer(tok_dir)
    return prepare_datasets(settings(files, tok_dir, **kw), tok, log=lambda m: None)


def write_json_array(path, records):
    with open(path, "w") as f:
        json.dump(records, f, indent=2)
    return str(path)


def write_csv(path, records):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    return str(path)


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


def save_to_disk(path, records):
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["json", "csv", "parquet", "arrow", "json_lines_in_json"])
def test_every_file_kind_reads_like_jsonl(tmp_path, llama3_dir, kind):
    reference = rows_of([write_jsonl(tmp_path / "ref.jsonl", ALPACA)], llama3_dir)
    path = {
        "json": lambda: write_json_array(tmp_path / "a.json", ALPACA),
        "csv": lambda: write_csv(tmp_path / "a.csv", ALPACA),
        "parquet": lambda: write_parquet(tmp_path / "a.parquet", ALPACA),
        "arrow": lambda: save_to_disk(tmp_path / "saved", ALPACA),
        "json_lines_in_json": lambda: write_jsonl(tmp_path / "lines.json", ALPACA),
    }[kind]()
    before = sorted(os.listdir(tmp_path))
    got = rows_of([path], llama3_dir)
    assert got.train.equals(reference.train)
    assert got.report.records_per_format() == {"alpaca": 3}
    assert sorted(os.listdir(tmp_path)) == before  # reading wrote nothing next to the data


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_nested_chat_columns(tmp_path, llama3_dir, kind):
    reference = rows_of([write_jsonl(tmp_path / "ref.jsonl", CHATS)], llama3_dir)
    path = write_parquet(tmp_path / "c.parquet", CHATS) if kind == "parquet" else save_to_disk(tmp_path / "c", CHATS)
    assert rows_of([path], llama3_dir).train.equals(reference.train)


def test_csv_with_byte_order_mark_reads_like_without(tmp_path, llama3_dir):
    plain = write_csv(tmp_path / "plain.csv", ALPACA)
    bom = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" starts the file with a byte order mark
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.csv").read_bytes())
    assert SourceFile(str(bom), "csv").columns() == ("instruction", "input", "output")
    assert rows_of([str(bom)], llama3_dir).train.equals(rows_of([plain], llama3_dir).train)


def test_globs_and_several_files_in_order(tmp_path, llama3_dir):
    (tmp_path / "d").mkdir()
    a = write_jsonl(tmp_path / "d" / "part-0.jsonl", ALPACA[:2])
    b = write_jsonl(tmp_path / "d" / "part-1.jsonl", CHATS)
    tok = load_tokenizer(llama3_dir)
    listed = rows_of([a, b], llama3_dir, packing=False)
    globbed = rows_of([str(tmp_path / "d" / "part-*.jsonl")], llama3_dir, packing=False)
    assert globbed.train.equals(listed.train)
    assert globbed.report.records_per_format() == {"alpaca": 2, "messages": 2}
    assert trained_segments(listed.train, tok) == [
        "le chat<|eot_id|>", "hello world<|eot_id|>", "world<|eot_id|>", "six<|eot_id|>",
    ]


def test_resolve_files_kinds_and_identity(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    saved = save_to_disk(tmp_path / "saved", ALPACA)
    files = resolve_files((a, saved, str(tmp_path / "*.jsonl")), "data.train_files")
    assert files == [SourceFile(a, "jsonl"), SourceFile(saved, "arrow")]  # the glob repeats a.jsonl: read once
    identity = files[1].identity()
    assert len(identity) >= 2 and all(os.path.isabs(p) for p, _, _ in identity)


def test_a_file_named_in_several_spellings_is_read_once(tmp_path, llama3_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", ALPACA)
    os.symlink(tmp_path / "a.jsonl", tmp_path / "link.jsonl")
    os.link(tmp_path / "a.jsonl", tmp_path / "hard.jsonl")  # `cp -al`: a real path of its own; it read twice
    specs = ["a.jsonl", "./a.jsonl", str(tmp_path / "a.jsonl"), "*.jsonl", "hard.jsonl"]
    assert resolve_files(tuple(specs), "data.train_files") == [SourceFile("a.jsonl", "jsonl")]
    data = rows_of(specs, llama3_dir)
    assert data.report.train.records == len(ALPACA)
    assert data.train.equals(rows_of(["a.jsonl"], llama3_dir).train)


def test_csv_locations_are_the_lines_where_rows_start(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "instruction,output\n"            # 1
        "say hello,hello\n"               # 2
        "\n"                              # 3
        '"two\n'                          # 4: a quoted field over two lines
        'lines",six\n'                    # 5
        "\n"                              # 6
        "too few\n"                       # 7
        "a,b,c\n"                         # 8
        "capital of france?,paris\n"      # 9
    )
    got = [str(r) if isinstance(r, BadRecord) else (str(r.location), r.value)
           for r in SourceFile(str(path), "csv").records()]
    assert got == [
        (f"{path}:2", {"instruction": "say hello", "output": "hello"}),
        (f"{path}:4", {"instruction": "two\nlines", "output": "six"}),
        f"{path}:7: the row has 1 value(s) but the header has 2 columns",
        f"{path}:8: the row has 3 value(s) but the header has 2 columns",
        (f"{path}:9", {"instruction": "capital of france?", "output": "paris"}),
    ]


def test_an_eval_file_that_a_train_glob_also_matches_is_refused(tmp_path, llama3_dir):
    """train_files=data/*.jsonl with eval_files=data/eval.jsonl trained on every eval record."""
    write_jsonl(tmp_path / "train.jsonl", ALPACA)
    write_jsonl(tmp_path / "eval.jsonl", ALPACA[:1])
    with pytest.raises(UserError, match=r"eval.jsonl is in both data.train_files and data.eval_files"):
        rows_of([str(tmp_path / "*.jsonl")], llama3_dir, eval_files=(str(tmp_path / "./eval.jsonl"),))
    data = rows_of([str(tmp_path / "train.jsonl")], llama3_dir, eval_files=(str(tmp_path / "eval.jsonl"),))
    assert (data.report.train.records, data.report.eval.records) == (3, 1)
    os.link(tmp_path / "train.jsonl", tmp_path / "hard_link.jsonl")  # a hard link: the same records
    with pytest.raises(UserError, match=r"hard_link.jsonl is in both data.train_files and data.eval_files"):
        rows_of([str(tmp_path / "train.jsonl")], llama3_dir, eval_files=(str(tmp_path / "hard_link.jsonl"),))


def test_blank_lines_before_a_csv_header_are_ignored(tmp_path, llama3_dir):
    """The blank first line was taken for the header: "cannot tell the format from its columns"."""
    (tmp_path / "t.csv").write_text("\n\ninstruction,output\nsay hello,hello\n")
    got = [(str(r.location), r.value) for r in SourceFile(str(tmp_path / "t.csv"), "csv").records()]
    assert got == [(f"{tmp_path / 't.csv'}:4", {"instruction": "say hello", "output": "hello"})]
    assert rows_of([str(tmp_path / "t.csv")], llama3_dir).report.train.records == 1


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("instruction,output,output\nsay hello,hello,bye\n")
    with pytest.raises(UserError, match=r"t.csv:1: the header names column\(s\) output more than once"):
        list(SourceFile(str(path), "csv").records())


@pytest.mark.parametrize("suffix, encoding", [(".jsonl", "utf-16"), (".json", "utf-16"), (".jsonl", "utf-32")])
def test_utf16_and_utf32_json_are_refused_as_a_whole(tmp_path, suffix, encoding):
    """json.loads guessed the encoding per line: a UTF-16 JSONL lost its first record under
    on_bad_record=skip, and a UTF-16 array was 'a list, expected a JSON object'."""
    path = tmp_path / f"t{suffix}"
    records = [{"text": f"hello {i}"} for i in range(3)]
    body = json.dumps(records) if suffix == ".json" else "\n".join(json.dumps(r) for r in records) + "\n"
    path.write_bytes(body.encode(encoding))  # Python writes the byte order mark
    with pytest.raises(UserError, match="is UTF-16 or UTF-32 text; save it as UTF-8"):
        list(SourceFile(str(path), suffix[1:]).records())
