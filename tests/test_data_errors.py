"""Bad input: one clear message naming file, line and field; exit code 2, no traceback, nothing written."""

import os
import subprocess
import sys

import pytest
from data_helpers import llama3_dir, make_tokenizer, plain_dir, settings, write_jsonl  # noqa: F401

from jaxtune.data import load_tokenizer, prepare_datasets
from jaxtune.errors import UserError, exit_on_user_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}
ALPACA = {"instruction": "say hello", "input": "", "output": "hello"}


def jsonl(*lines):
    return lambda d: [write_jsonl(d / "d.jsonl", lines)]


def raw(name, text):
    def make(d):
        (d / name).write_text(text)
        return [str(d / name)]
    return make


def parquet(records):
    def make(d):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), d / "t.parquet")
        return [str(d / "t.parquet")]
    return make


def csv_text(text):
    return raw("t.csv", text)


# (case, files, settings overrides, tokenizer, words the message must contain)
CASES = [
    ("broken_json_line", jsonl({"text": "a"}, '{"text": "b"', {"text": "c"}), {}, "plain",
     ["d.jsonl:2", "malformed JSON"]),
    # Half an emoji (a lone UTF-16 surrogate): json.loads takes it, no tokenizer can encode it.
    ("lone_surrogate", jsonl(CHAT, '{"messages": [{"role": "user", "content": "hi"}, '
                                   '{"role": "assistant", "content": "ok \\ud83d"}]}'), {}, "llama3",
     ["d.jsonl:2", "field 'messages[1].content'", "'\\ud83d' at character 3", "surrogate"]),
    ("wrong_type", jsonl({"text": "a"}, {"text": 5}), {}, "plain",
     ["d.jsonl:2", "field 'text'", "a number, expected a string"]),
    ("null_field", jsonl(ALPACA, {"instruction": "x", "output": None}), {}, "plain",
     ["d.jsonl:2", "field 'output' is null"]),
    ("missing_field", jsonl(ALPACA, {"instruction": "x", "input": "y"}), {}, "plain",
     ["d.jsonl:2", "missing field 'output'"]),
    ("empty_messages", jsonl(CHAT, {"messages": []}), {}, "llama3",
     ["d.jsonl:2", "field 'messages' is an empty list"]),
    ("unknown_role", jsonl(CHAT, {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}),
     {}, "llama3", ["d.jsonl:2", "messages[1].role", "unknown role 'bot'"]),
    ("unknown_sharegpt_from",
     jsonl({"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}),
     {}, "llama3", ["d.jsonl:1", "conversations[1].from", "unknown role 'robot'"]),
    ("turn_not_an_object", jsonl({"messages": ["hello"]}), {}, "llama3",
     ["d.jsonl:1", "field 'messages[0]' is a string, expected an object"]),
    ("content_not_a_string", jsonl({"messages": [{"role": "user", "content": ["a"]}]}), {}, "llama3",
     ["d.jsonl:1", "field 'messages[0].content' is a list"]),
    ("record_not_an_object", jsonl({"text": "a"}, [1, 2]), {}, "plain", ["d.jsonl:2", "the record is a list"]),
    ("json_array_item_not_an_object", raw("a.json", '[{"text": "a"}, 5]'), {}, "plain",
     ["a.json[1]", "the record is a number"]),
    ("empty_file", raw("e.jsonl", "\n\n"), {}, "plain", ["e.jsonl is empty"]),
    ("empty_json_array", raw("e.json", "[]"), {}, "plain", ["e.json is empty"]),
    ("malformed_json_array", raw("a.json", '[\n{"text": "a"},\n{"text": }\n]'), {}, "plain",
     ["a.json:3", "malformed JSON"]),
    ("missing_file", lambda d: [str(d / "nope.jsonl")], {}, "plain", ["data.train_files", "nope.jsonl does not exist"]),
    ("glob_matches_nothing", lambda d: [str(d / "*.parquet")], {}, "plain", ["glob", "*.parquet", "matches no files"]),
    ("unsupported_extension", raw("notes.txt", "hello"), {}, "plain", ["notes.txt", "unsupported file type '.txt'"]),
    ("plain_directory", lambda d: [str(d)], {}, "plain", ["not a dataset saved with datasets.save_to_disk"]),
    ("unknown_format", jsonl({"text": "a"}), {"format": "xml"}, "plain", ["unknown data format 'xml'"]),
    ("undetectable_keys", jsonl({"question": "a", "answer": "b"}), {}, "plain",
     ["d.jsonl:1", "cannot tell the format", "question, answer", "rename the fields, or set data.format"]),
    # setting data.format would not help: the fix is the field's name
    ("misspelt_key", jsonl({"prompt": "a", "completon": "b"}), {}, "plain",
     ["cannot tell the format", "(prompt, completon) ('completon' looks like 'completion'); expected"]),
    ("misspelt_column", csv_text("instruction,input,ouput\nsay hi,,hi\n"), {}, "plain",
     ["cannot tell the format from its columns (instruction, input, ouput) ('ouput' looks like 'output')"]),
    # read as JSON lines, it was a malformed-JSON error per line ("all records are bad" with skip)
    # json.dump's default: one line, read as one record of no known format
    ("json_one_object_one_line", raw("m.json", '{"data": [{"text": "a"}, {"text": "b"}]}\n'), {}, "plain",
     ["m.json:1: cannot tell the format", "(the records seem to be the list under 'data': put them in a top-level "
      "array, or write them as JSON lines)"]),
    ("json_one_object", raw("w.json", '{\n  "data": [\n    {"text": "a"},\n    {"text": "b"}\n  ]\n}\n'), {},
     "plain", ["w.json holds one JSON object (keys: data), not an array of records or one record per line; put the "
               "records in a top-level array (e.g. the list under 'data')"]),
    ("all_samples_too_long", jsonl({"text": "hello world " * 20}, {"text": "the quick brown fox " * 10}),
     {"max_seq_len": 8, "truncation": "drop"}, "plain",
     ["all 2 train sample(s) were dropped", "2 longer than data.max_seq_len=8",
      "; raise data.max_seq_len, use data.truncation=truncate, or fix the data."]),
    ("no_trained_tokens_left", jsonl({"prompt": "hello world " * 20, "completion": "hi"}), {"max_seq_len": 8},
     "plain", ["all 1 train sample(s) were dropped", "no trained token",
               "; raise data.max_seq_len, or fix the data."]),  # not truncation=truncate: it was truncated
    ("csv_missing_column", csv_text("instruction,input\nsay hi,\n"), {"format": "alpaca"}, "plain",
     ["t.csv has no column 'output'", "format alpaca", "instruction, input"]),
    ("csv_short_row", csv_text("text,extra\na,b\nc\n"), {"format": "text"}, "plain",
     ["t.csv:3", "1 value(s) but the header has 2 columns"]),
    ("csv_short_first_row", csv_text("text,extra\nc\na,b\n"), {"format": "text"}, "plain",
     ["t.csv:2: the row has 1 value(s)"]),
    # csv's default (strict=False) made the rest of the file one completion: 5 records became 1
    # named at the row where the quote opened (line 3), not at the end of the file
    ("csv_quote_left_open", csv_text('prompt,completion\nq1,a1\nhow long?,"5 inches\nq2,a2\nq3,a3\n'), {}, "plain",
     ["t.csv:3: malformed CSV (a quoted field in the row that starts here is never closed)."]),
    ("csv_quote_then_text", csv_text('prompt,completion\nq1,a1\nhow long?,"5" inches\nq3,a3\n'), {}, "plain",
     ["t.csv:3: malformed CSV in the row that starts here", "',' expected after '\"'"]),
    # the quote opened on line 3 runs into line 4, where the reader fails: the row's line is named
    ("csv_quote_runs_on", csv_text('prompt,completion\nq1,a1\n"q2,a2\nq3,"a3"\n'), {}, "plain",
     ["t.csv:3: malformed CSV in the row that starts here (',' expected after '\"'; found at line 4)."]),
    ("parquet_unknown_columns", parquet([{"question": "a", "answer": "b"}]), {}, "plain",
     ["t.parquet", "cannot tell the format from its columns (question, answer)"]),
    ("parquet_null_in_row", parquet([ALPACA, {"instruction": "x", "input": "", "output": None}]), {}, "plain",
     ["t.parquet row 1", "field 'output' is null"]),
    ("chat_without_template", jsonl(CHAT), {}, "plain", ["d.jsonl:1", "needs a chat template"]),
    ("starts_with_assistant", jsonl({"messages": [{"role": "assistant", "content": "hi"}]}), {}, "llama3",
     ["d.jsonl:1", "starts with an assistant turn"]),
    ("template_breaks_prefixes", jsonl(CHAT), {}, "last_marker",
     ["d.jsonl:1", "renders the conversation before assistant turn 1 differently", "prefix"]),
    ("template_raises", jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                            {"role": "assistant", "content": "c"}]}), {}, "alternating",
     ["d.jsonl:1", "chat template cannot render", "roles must alternate"]),
    ("eval_fraction_too_big", jsonl({"text": "a"}), {"eval_fraction": 0.5}, "plain",
     ["data.eval_fraction=0.5 of 1 record(s) leaves no training records"]),
    ("eval_file_missing", jsonl({"text": "a"}), {"eval_files": ("/nonexistent/eval.jsonl",)}, "plain",
     ["data.eval_files", "/nonexistent/eval.jsonl does not exist"]),
]

TEMPLATES = {
    # Marks the last message: earlier turns render differently once more turns follow.
    "last_marker": "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
                   "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
    # Like Llama 2's template: refuses conversations whose roles do not alternate.
    "alternating": "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                   "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}assistant: {% endif %}",
}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, llama3_dir, plain_dir):
    dirs = {"llama3": llama3_dir, "plain": plain_dir}
    for name, template in TEMPLATES.items():
        path = tmp_path_factory.mktemp(f"tok_{name}")
        tok = make_tokenizer(path, None)
        tok.chat_template = template
        tok.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def run_case(tmp_path, tokenizer_dirs, files, overrides, tok_name, capsys):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    paths = files(data_dir)
    before = sorted(os.listdir(data_dir))
    cache_dir = tmp_path / "cache"
    tok_dir = tokenizer_dirs[tok_name]
    with pytest.raises(SystemExit) as exc:
        with exit_on_user_error():
            s = settings(paths, tok_dir, cache_dir=str(cache_dir), **overrides)
            prepare_datasets(s, load_tokenizer(tok_dir), log=lambda m: None)
    err = capsys.readouterr().err
    assert sorted(os.listdir(data_dir)) == before and not cache_dir.exists()  # nothing written anywhere
    return exc.value.code, err


@pytest.mark.parametrize("case,files,overrides,tok_name,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(tmp_path, tokenizer_dirs, capsys, case, files, overrides, tok_name, words):
    code, err = run_case(tmp_path, tokenizer_dirs, files, overrides, tok_name, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"


def test_missing_tokenizer(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        with exit_on_user_error():
            load_tokenizer(str(tmp_path / "no_tokenizer"))
    assert exc.value.code == 2
    assert "no_tokenizer does not exist" in capsys.readouterr().err


def test_a_model_directory_without_tokenizer_files_says_so(tmp_path, plain_dir):
    """transformers' own message was "Couldn't instantiate the backend tokenizer from one of: ",
    whose first line was all that was shown."""
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match=r"has no tokenizer files \(tokenizer.json\); copy them there"):
        load_tokenizer(str(tmp_path))
    # Another model type: transformers built a tokenizer with no vocabulary (each text one token).
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UserError, match=r"has no tokenizer files \(tokenizer.json\); copy them there"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match=r"tokenizer.json is a file; the tokenizer path is the directory that holds it"):
        load_tokenizer(os.path.join(plain_dir, "tokenizer.json"))


def test_skip_counts_bad_records(tmp_path, llama3_dir, tokenizer_dirs):
    bad_role = {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
    # the tokenizer raised TypeError for the whole batch, which no skipping caught
    surrogate = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\\udc00"}]}'
    data = write_jsonl(tmp_path / "d.jsonl", [CHAT, "{not json", CHAT, {"messages": []}, bad_role, CHAT, "", CHAT,
                                              surrogate])
    got = prepare_datasets(settings(data, llama3_dir, on_bad_record="skip"), load_tokenizer(llama3_dir),
                           log=lambda m: None)
    r = got.report
    assert r.bad_records == 4 and r.train.records == 4 and r.train.samples == 4
    assert [e.split(": ")[0] for e in r.bad_record_examples] == [f"{data}:2", f"{data}:4", f"{data}:5", f"{data}:9"]
    assert r.files[0].records == 4 and r.files[0].bad_records == 4
    assert "skipped 4 bad record(s)" in r.summary()

    # Conversations the template refuses are found while tokenizing; they are skipped and counted too.
    refused = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                            {"role": "assistant", "content": "c"}]}
    data = write_jsonl(tmp_path / "e.jsonl", [CHAT, refused, CHAT])
    tok_dir = tokenizer_dirs["alternating"]
    got = prepare_datasets(settings(data, tok_dir, on_bad_record="skip"), load_tokenizer(tok_dir), log=lambda m: None)
    assert (got.report.bad_records, got.report.train.bad_records, got.report.train.samples) == (1, 1, 2)
    assert "roles must alternate" in got.report.bad_record_examples[0]


def test_a_large_json_file_whose_first_line_is_bad_is_not_read_whole(tmp_path, monkeypatch):
    """To tell a JSON object spread over lines from JSON lines with a bad first line, the file
    was parsed whole: twice its size in memory on every process, for a multi-GB file."""
    from jaxtune.data import readers

    [path] = raw("big.json", '{"text": "a"\n{"text": "b"}\n{"text": "c"}\n')(tmp_path)
    monkeypatch.setattr(readers, "_ONE_OBJECT_READ_LIMIT", 10)
    monkeypatch.setattr(readers.json, "load", lambda *a, **k: pytest.fail("read the whole file"))
    records = list(readers._read_json(path))
    assert [type(r).__name__ for r in records] == ["BadRecord", "Record", "Record"]


def test_empty_trained_fields_are_warned_about_in_the_run_log(tmp_path, llama3_dir):
    """tools/check_data.py calls an empty completion an error (the model learns to say nothing),
    while training took 4 in 20 without a word; the warning also comes from the data cache."""
    silent = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""}])
    chats = write_jsonl(tmp_path / "c.jsonl", [CHAT, CHAT, silent])
    s = settings((pairs, chats), llama3_dir, cache_dir=str(tmp_path / "cache"))
    for hit in (False, True):
        report = prepare_datasets(s, load_tokenizer(llama3_dir), log=lambda m: None).report
        assert report.cache_hit is hit and report.empty_trained == 2
        assert (f"warning: 2 empty or whitespace-only trained field(s), which teach the model to say nothing, e.g. "
                f"{pairs}:2 (completion); {chats}:3 (assistant content) (tools/check_data.py lists them)"
                ) in report.summary()
    assert f"train data: {pairs}, {chats}: 5 records (prompt_completion: 2, messages: 3)" in report.summary()
    clean = write_jsonl(tmp_path / "clean.jsonl", [CHAT, CHAT])
    report = prepare_datasets(settings(clean, llama3_dir), load_tokenizer(llama3_dir), log=lambda m: None).report
    assert report.empty_trained == 0 and "say nothing" not in report.summary()


def test_all_records_bad_is_an_error_even_when_skipping(tmp_path, plain_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ["{", "{"])
    with pytest.raises(UserError, match=r"data.train_files has no valid records: all 2 record\(s\) are bad, "
                                        r"the first: .*d.jsonl:1: malformed JSON"):
        prepare_datasets(settings(data, plain_dir, on_bad_record="skip"), load_tokenizer(plain_dir), log=lambda m: None)


def test_subprocess_exit_code_and_no_traceback(tmp_path, plain_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, '{"text": "b"'])
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from data_helpers import settings\n"
        "from jaxtune.data import load_tokenizer, prepare_datasets\n"
        "from jaxtune.errors import UserError, exit_on_user_error\n"
        "with exit_on_user_error():\n"
        f"    prepare_datasets(settings({str(data)!r}, {plain_dir!r}, cache_dir={str(tmp_path / 'cache')!r}),\n"
        f"                     load_tokenizer({plain_dir!r}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"error: {data}:2: malformed JSON" in proc.stderr
    assert not (tmp_path / "cache").exists()
