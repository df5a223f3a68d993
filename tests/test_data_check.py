"""tools/check_data.py finds planted duplicates, contamination and empty completions, exactly."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
from data_helpers import WORDS, llama3_dir, make_tokenizer, plain_dir, settings, write_jsonl  # noqa: F401
from run_helpers import write_recipe

from jaxtune.data import load_tokenizer, prepare_datasets
from jaxtune.errors import UserError
from jaxtune.data.quality import check_data as check
from jaxtune.data.quality import normalise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import check_data  # noqa: E402


def clean_records(n, seed):
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"instruction": words(rng.randint(4, 10)), "input": "", "output": words(rng.randint(3, 9))}
            for _ in range(n)]


@pytest.fixture
def planted(tmp_path):
    train = clean_records(30, seed=1)
    passage = " ".join(WORDS[10:30])  # 20 words, in one train record only
    train[7]["output"] = passage
    lines = list(train)
    lines += [dict(train[0]), dict(train[1]), dict(train[1])]  # 3 exact duplicates
    lines += [{**train[2], "instruction": train[2]["instruction"].upper() + "!"},  # 2 near duplicates
              {**train[3], "output": "  " + train[3]["output"].replace(" ", "   ") + " ."}]
    lines += [{"instruction": "what is blue", "input": "", "output": ""},  # 2 empty completions
              {"instruction": "what is red", "input": "", "output": " \n "}]
    lines += ['{"instruction": "broken', {"instruction": "no output"}]  # 2 invalid records (lines 38, 39)
    evals = clean_records(6, seed=2)
    evals += [{**train[4], "output": train[4]["output"].title()}, dict(train[5])]  # 2 in train (normalised)
    evals += [{"instruction": "quote", "input": "", "output": "so " + passage + " end"}]  # 1 contaminated
    return write_jsonl(tmp_path / "train.jsonl", lines), write_jsonl(tmp_path / "eval.jsonl", evals)


def test_normalise():
    assert normalise("  Hello,   WORLD!\n") == "hello world"
    assert normalise("don't stop") == "dont stop"


def test_planted_problems_are_counted_exactly(tmp_path, llama3_dir, planted):
    train, evals = planted
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "tools/check_data.py", "--data", train, "--eval", evals, "--tokenizer", llama3_dir,
         "--max-seq-len", "256", "--out", str(out), "--show", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # errors found
    report = json.loads(out.read_text())
    t = report["train"]
    assert t["records"] == 37 and t["invalid_records"] == 2
    assert [e.split(": ")[0] for e in t["invalid_examples"]] == [f"{train}:38", f"{train}:39"]
    assert "missing field 'output'" in t["invalid_examples"][1]
    assert t["exact_duplicates"] == 3 and t["near_duplicates"] == 2
    assert t["empty_fields"] == {"output": 2}
    assert t["records_per_format"] == {"alpaca": 37}
    assert t["truncation"]["dropped_no_trained_tokens"] == 0  # an empty completion still trains its EOS
    assert report["overlap"] == {
        "ngram": 13, "exact": 2, "ngram_matches": 1,
        "examples": [f"{evals}:7 = {train}:5", f"{evals}:8 = {train}:6", f"{evals}:9 ~ {train}:8"],
    }
    kinds = {f["kind"]: (f["severity"], f["count"]) for f in report["findings"]}
    assert kinds == {
        "train_invalid_records": ("error", 2), "train_empty_completions": ("error", 2),
        "train_exact_duplicates": ("warning", 3), "train_near_duplicates": ("warning", 2),
        "eval_in_train": ("error", 2), "eval_ngram_overlap": ("warning", 1),
    }
    assert report["num_errors"] == 3 and report["num_warnings"] == 3
    # --show renders the first sample with its trained tokens marked.
    assert f"--- {train}:1 (" in proc.stdout
    assert "[[" + json.loads(open(train).readline())["output"] + "<|eot_id|>]]" in proc.stdout
    assert "result: 3 error(s), 3 warning(s)" in proc.stdout


def test_lengths_and_warnings_only_exit_zero(tmp_path, plain_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": " ".join(WORDS[:n])} for n in (2, 4, 8, 40)])
    out = tmp_path / "r.json"
    code = check_data.main(["--data", data, "--tokenizer", plain_dir, "--max-seq-len", "16", "--out", str(out)])
    assert code == 0  # one sample too long: a warning
    t = json.loads(out.read_text())["train"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plain_dir)
    lengths = sorted(len(tok(" ".join(WORDS[:n]))["input_ids"]) + 1 for n in (2, 4, 8, 40))
    assert t["token_lengths"]["min"] == lengths[0] and t["token_lengths"]["max"] == lengths[-1]
    assert t["longer_than_max_seq_len"] == 1 and t["truncation"]["truncated"] == 1
    assert t["trained_tokens"]["max"] == 15  # the truncated sample: 16 tokens, the first is not a target
    assert "would be truncated" in capsys.readouterr().out

    code = check_data.main(["--data", data, "--tokenizer", plain_dir, "--max-seq-len", "16", "--truncation", "drop",
                            "--out", str(out)])
    assert code == 0 and json.loads(out.read_text())["train"]["truncation"]["dropped_too_long"] == 1


def test_config_recipe_and_flag_overrides(tmp_path, plain_dir):
    records = [{"prompt": "hello", "completion": ""}, {"prompt": "a", "completion": "b"}]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    recipe = write_recipe(tmp_path / "recipe.py", {"model.hf_path": plain_dir, "data.train_files": (data,),
                                                   "data.max_seq_len": 64, "data.eval_fraction": 0.0})
    out = tmp_path / "r.json"
    assert check_data.main(["--config", recipe, "--out", str(out)]) == 1  # an empty completion
    report = json.loads(out.read_text())
    assert report["max_seq_len"] == 64 and report["tokenizer"] == plain_dir
    assert report["train"]["empty_fields"] == {"completion": 1}
    assert check_data.main(["--config", recipe, "--max-seq-len", "32", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["max_seq_len"] == 32


def test_a_recipes_home_relative_paths_are_expanded_as_run_py_expands_them(tmp_path, plain_dir, monkeypatch):
    """check_data said "tokenizer directory ~/tok does not exist" for a recipe run.py accepts."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(plain_dir, tmp_path / "tok")
    write_jsonl(tmp_path / "d.jsonl", clean_records(8, seed=5))
    recipe = write_recipe(tmp_path / "recipe.py", {"model.hf_path": "~/tok", "data.train_files": ("~/d.jsonl",),
                                                   "data.eval_fraction": 0.0, "train.global_batch_size": 1})
    out = tmp_path / "r.json"
    assert check_data.main(["--config", recipe, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tokenizer"] == str(tmp_path / "tok")


@pytest.mark.parametrize("packing", [True, False])
def test_a_recipe_whose_data_fills_no_batch_is_an_error(tmp_path, run_assets, packing):
    """Training refuses data of fewer rows than one batch, before loading the model; the check
    says the same sentence. Turning packing off gives more rows, so only then is it advice."""
    import jaxtune.train
    from run_helpers import make_config

    data = write_jsonl(tmp_path / "d.jsonl", clean_records(3, seed=5))
    overrides = {"model.hf_path": run_assets.model, "data.train_files": (data,), "data.eval_fraction": 0.0,
                 "data.packing": packing, "train.global_batch_size": 8, "workdir": str(tmp_path / "run"),
                 "data.cache_dir": str(tmp_path / "cache"), "logging.progress_bar": False}
    out = tmp_path / "r.json"
    assert check_data.main(["--config", write_recipe(tmp_path / "recipe.py", overrides), "--out", str(out)]) == 1
    kinds = {f["kind"]: f["message"] for f in json.loads(out.read_text())["findings"]}
    message = kinds["fewer_rows_than_a_batch"]
    rows = "1 row after packing" if packing else "3 rows"
    assert message.startswith(f"the training data has {rows}, fewer than one batch of train.global_batch_size=8 rows")
    assert ("turn off data.packing" in message) == packing
    with pytest.raises(UserError) as refused:
        jaxtune.train.run(make_config(overrides))
    assert str(refused.value) == message


@pytest.mark.parametrize("packing", [True, False])
def test_rows_are_laid_out_as_training_will(tmp_path, plain_dir, packing):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hello ", "completion": "world"}] * 6)
    s = settings(data, plain_dir, packing=packing, max_seq_len=128)
    tok = load_tokenizer(plain_dir)
    report, _ = check(s, tok)
    assert report.train.packed_rows == len(prepare_datasets(s, tok, log=lambda m: None).train)
    assert report.train.packed_rows == (1 if packing else 6)
    assert ("packed" if packing else "one sample per row") in report.summary()


def test_unusable_input_exits_2_without_traceback(tmp_path, plain_dir):
    proc = subprocess.run(
        [sys.executable, "tools/check_data.py", "--data", str(tmp_path / "missing.jsonl"), "--tokenizer", plain_dir],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --data: {tmp_path / 'missing.jsonl'} does not exist."


@pytest.mark.parametrize("where", ["missing_dir", "a_directory"])
def test_an_unwritable_out_path_is_refused_before_the_check(tmp_path, plain_dir, where, monkeypatch):
    from jaxtune.data import quality

    out = tmp_path / "nope" / "r.json" if where == "missing_dir" else tmp_path
    monkeypatch.setattr(quality, "check_data", lambda *a, **k: pytest.fail("the check ran"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    with pytest.raises(UserError, match=r"--out .*: not a file in an existing, writable directory"):
        check_data.main(["--data", data, "--tokenizer", plain_dir, "--out", str(out)])



def test_token_ids_beyond_the_models_vocabulary_are_errors(tmp_path, plain_dir):
    """Training refuses such data (every step would be NaN); the check says so first."""
    import shutil

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": " ".join(WORDS[i:i + 6])} for i in range(0, 60, 6)])
    model_dir = tmp_path / "model"
    shutil.copytree(plain_dir, model_dir)
    _, samples = check(settings((data,), tokenizer_path=str(model_dir)), load_tokenizer(str(model_dir)))
    largest = sorted(max(s.ids) for s, _ in samples)
    vocab = largest[6]  # the samples whose largest id is >= this have no embedding for it
    beyond = sum(m >= vocab for m in largest)
    assert 0 < beyond < len(largest)
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": int(vocab)}))
    out = tmp_path / "r.json"
    assert check_data.main(["--data", data, "--tokenizer", str(model_dir), "--out", str(out)]) == 1
    found = {f["kind"]: f for f in json.loads(out.read_text())["findings"]}  # defaults hold 5% out as eval
    assert sum(found[f"{split}_token_ids_beyond_vocabulary"]["count"] for split in ("train", "eval")
               if f"{split}_token_ids_beyond_vocabulary" in found) == beyond
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": int(largest[-1]) + 1}))
    assert check_data.main(["--data", data, "--tokenizer", str(model_dir), "--out", str(out)]) == 0


def test_the_model_directory_is_the_recipes_else_the_tokenizer_directory():
    """Turn-ending tokens are read from the model directory's generation_config.json, as in training."""
    from jaxtune.config import defaults

    args = check_data.parse(["--data", "d.jsonl", "--tokenizer", "/tok"])
    assert check_data.settings_from(args, defaults()).model_path == "/tok"
    recipe = defaults()
    recipe.model.hf_path = "/models/llama"
    s = check_data.settings_from(args, recipe)
    assert (s.tokenizer_path, s.model_path) == ("/tok", "/models/llama")
    s = check_data.settings_from(check_data.parse(["--data", "d.jsonl"]), recipe)
    assert (s.tokenizer_path, s.model_path) == ("/models/llama", "/models/llama")


def test_the_check_ends_turns_where_the_model_directory_says(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", "llama3")  # no generation_config.json here
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "generation_config.json").write_text(
        json.dumps({"eos_token_id": tok.convert_tokens_to_ids("<|eot_id|>")}))
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}])
    s = settings((data,), tokenizer_path=str(tmp_path / "tok"), model_path=str(tmp_path / "model"))
    _, ((sample, _),) = check(s, tok)
    assert tok.decode(sample.ids[sample.mask]) == "world<|eot_id|>"  # no <|end_of_text|> appended


def test_the_check_holds_out_eval_and_shows_samples_as_training_will(tmp_path, plain_dir, capsys):
    """Without eval files, training trains on 1 - eval_fraction of the records and truncates or
    drops long ones: the check's counts and --show must describe that, not the raw records."""
    records = [{"prompt": f"p{i} " + " ".join(WORDS[:3]), "completion": " ".join(WORDS[i:i + 4])} for i in range(20)]
    records[0]["completion"] = " ".join(WORDS[:60])  # longer than max_seq_len: truncated
    data = write_jsonl(tmp_path / "d.jsonl", records)
    s = settings((data,), tokenizer_path=plain_dir, max_seq_len=32, eval_fraction=0.25, seed=3)
    report, shown = check(s, load_tokenizer(plain_dir))
    prepared = prepare_datasets(s, load_tokenizer(plain_dir))
    assert (report.train.records, report.eval.records) == (prepared.report.train.records, prepared.report.eval.records)
    assert (report.train.packed_rows, report.eval.packed_rows) == (len(prepared.train), len(prepared.eval))
    assert report.eval_source.startswith("held out of train") and "eval: held out of train" in report.summary()
    notes = {str(sample.location): note for sample, note in shown}
    assert len(shown) == report.train.records
    assert notes[f"{data}:1"].startswith("truncated from")  # seed 3 keeps the long record in train
    assert sum(note == "" for note in notes.values()) == len(notes) - 1


@pytest.mark.parametrize("valid", [0, 1])
def test_invalid_records_are_listed_when_too_few_are_left_to_hold_out_eval(tmp_path, plain_dir, capsys, valid):
    """With no eval files and (almost) every record invalid, the check stopped at the eval
    hold-out ("leaves no training records", exit 2) without listing the invalid records. With
    none valid, the hold-out is not an error of its own: the invalid records are the cause."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b c"}] * valid + ["{broken", {"text": None}])
    code = check_data.main(["--data", data, "--tokenizer", plain_dir, "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 1
    assert f"d.jsonl:{valid + 1}: malformed JSON" in out and f"d.jsonl:{valid + 2}: field 'text' is null" in out
    assert ("leaves no training records" in out) is bool(valid)
    assert not valid or "--eval-fraction=0.05 of 1 record(s) leaves no training records" in out


def test_show_renders_a_sample_of_no_tokens(plain_dir):
    """A template that renders a record as nothing gave an IndexError in --show."""
    import numpy as np

    from jaxtune.data.quality import render_sample
    from jaxtune.data.records import Location
    from jaxtune.data.tokenize import TokenizedSample

    tok = load_tokenizer(plain_dir)
    empty = TokenizedSample(Location("d.jsonl", line=1), np.zeros(0, np.int32), np.zeros(0, bool))
    assert render_sample(tok, empty) == ""
    ids = np.asarray(tok("hello world", add_special_tokens=False)["input_ids"], np.int32)
    one = TokenizedSample(Location("d.jsonl", line=2), ids, np.ones(len(ids), bool))
    assert render_sample(tok, one).endswith("]]")  # trained tokens after the first are marked


@pytest.mark.parametrize("split", ["train", "eval"])
def test_a_split_whose_every_sample_is_dropped_is_an_error_as_in_training(tmp_path, plain_dir, split):
    """The check reported rows 0 of 2 and exit 0 for data that training refuses."""
    short, long = {"text": "hello world"}, {"text": " ".join(WORDS[:30])}
    train = write_jsonl(tmp_path / "t.jsonl", [long, long] if split == "train" else [short, short])
    evals = write_jsonl(tmp_path / "e.jsonl", [short] if split == "train" else [long])
    out = tmp_path / "r.json"
    args = ["--data", train, "--eval", evals, "--tokenizer", plain_dir, "--max-seq-len", "8", "--truncation", "drop"]
    assert check_data.main([*args, "--out", str(out)]) == 1
    kinds = {f["kind"]: f["message"] for f in json.loads(out.read_text())["findings"]}
    with pytest.raises(UserError) as refused:  # what training says of the same data
        prepare_datasets(settings(train, plain_dir, eval_files=(evals,), max_seq_len=8, truncation="drop"),
                         load_tokenizer(plain_dir), log=lambda m: None)
    assert kinds[f"{split}_all_dropped"] == check_data.in_flag_words(str(refused.value))
    assert str(refused.value).startswith(f"all {2 if split == 'train' else 1} {split} sample(s) were dropped")
    assert kinds[f"{split}_all_dropped"].endswith("raise --max-seq-len, use --truncation=truncate, or fix the data.")


def test_without_a_recipe_messages_name_the_flags(tmp_path, plain_dir):
    """Hints named the settings (data.eval_files, data.max_seq_len) that only a recipe sets."""
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "hello world"}])
    out = tmp_path / "r.json"
    assert check_data.main(["--data", one, "--tokenizer", plain_dir, "--out", str(out)]) == 1
    kinds = {f["kind"]: f["message"] for f in json.loads(out.read_text())["findings"]}
    assert kinds["no_records_left_to_train"] == ("--eval-fraction=0.05 of 1 record(s) leaves no training records; "
                                                 "add data or set --eval.")
    assert check_data.main(["--data", one, "--tokenizer", plain_dir, "--eval-fraction", "0"]) == 0
    with pytest.raises(UserError, match=r"^--max-seq-len must be at least 2, got 1\.$"):
        check_data.main(["--data", one, "--tokenizer", plain_dir, "--max-seq-len", "1"])
    recipe = write_recipe(tmp_path / "recipe.py", {"model.hf_path": plain_dir, "data.train_files": (one,)})
    with pytest.raises(UserError, match=r"^data.max_seq_len must be at least 2, got 1\.$"):  # the recipe's words
        check_data.main(["--config", recipe, "--max-seq-len", "1"])
    with pytest.raises(UserError, match=r"^cannot write --out /proc/report.json \("):  # after the whole check
        check_data.main(["--data", one, "--tokenizer", plain_dir, "--eval-fraction", "0", "--out", "/proc/report.json"])


def test_flags_turn_a_recipes_train_on_prompt_off_and_on(tmp_path, plain_dir):
    """`--train-on-prompt` could only turn it on: a recipe's True could not be checked as False."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"hello there {w} ", "completion": "world"} for w in WORDS[:3]])
    out = tmp_path / "r.json"

    def trained(*flags, recipe_value):
        recipe = write_recipe(tmp_path / "recipe.py", {"model.hf_path": plain_dir, "data.train_files": (data,),
                                                       "data.eval_fraction": 0.0, "train.global_batch_size": 1,
                                                       "data.train_on_prompt": recipe_value})
        assert check_data.main(["--config", recipe, *flags, "--out", str(out)]) == 0
        report = json.loads(out.read_text())
        return report["train_on_prompt"], report["train"]["trained_tokens"]["max"]

    on, off = trained(recipe_value=True), trained("--no-train-on-prompt", recipe_value=True)
    assert on[0] is True and off[0] is False and off[1] < on[1]
    assert trained("--train-on-prompt", recipe_value=False) == on
