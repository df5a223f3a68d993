"""DataSettings: read once from the config, with its defaults; bad values are user errors."""

import pytest

from jaxtune.config import defaults
from jaxtune.data import DataSettings
from jaxtune.errors import UserError


def test_from_config_defaults_and_overrides():
    c = defaults()
    c.workdir = "runs/x"
    c.model.hf_path = "/models/llama"
    c.data.train_files = ("a.jsonl", "b/*.parquet")
    c.train.seed = 17
    s = DataSettings.from_config(c)
    assert s == DataSettings(
        train_files=("a.jsonl", "b/*.parquet"), eval_files=(), format="auto", tokenizer_path="/models/llama",
        max_seq_len=1024, model_path="/models/llama", packing=True, truncation="truncate", train_on_prompt=False,
        on_bad_record="error", eval_fraction=0.05, cache_dir="runs/x/data_cache", seed=17,
    )
    c.data.tokenizer_path = "/tokenizers/t"
    c.data.cache_dir = "/shared/cache"
    s = DataSettings.from_config(c)
    # The model directory stays the model's: its generation_config.json names turn-ending tokens.
    assert (s.tokenizer_path, s.model_path, s.cache_dir) == ("/tokenizers/t", "/models/llama", "/shared/cache")


@pytest.mark.parametrize("field,value,words", [
    ("format", "yaml", "unknown data format 'yaml'"),
    ("truncation", "cut", "data.truncation must be truncate or drop"),
    ("on_bad_record", "ignore", "data.on_bad_record must be error or skip"),
    ("max_seq_len", 1, "data.max_seq_len must be at least 2"),
    ("eval_fraction", 1.0, "data.eval_fraction must be in [0, 1)"),
])
def test_bad_values(field, value, words):
    kwargs = dict(train_files=("a.jsonl",), eval_files=(), format="auto", tokenizer_path="t", max_seq_len=8)
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace(")", r"\)")):
        DataSettings(**{**kwargs, field: value})
    assert DataSettings(**{**kwargs, "train_files": "one.jsonl"}).train_files == ("one.jsonl",)
