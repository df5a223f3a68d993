"""Exact token ids and loss masks, per format, against apply_chat_template / the documented prompts."""

import json
import shutil

import numpy as np
import pytest
from data_helpers import llama3_dir, make_tokenizer, plain_dir, settings, write_jsonl  # noqa: F401

from jaxtune.data import load_tokenizer, prepare_datasets
from jaxtune.data.tokenize import eos_token_ids

# The documented Stanford Alpaca prompts (docs/data.md), written out.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """ChatML (Qwen2 Instruct): no BOS, eos <|im_end|> ends every turn."""
    path = tmp_path_factory.mktemp("tok_chatml")
    make_tokenizer(path, "chatml", eos="<|im_end|>", pad="<|endoftext|>", bos=None)
    return str(path)


@pytest.fixture(scope="module")
def chatml_pad_eos_dir(tmp_path_factory):
    """ChatML with a base-model EOS that no turn contains, and pad == eos."""
    path = tmp_path_factory.mktemp("tok_chatml_base")
    make_tokenizer(path, "chatml", eos="<|endoftext|>", pad="<|endoftext|>", bos=None)
    return str(path)


def one_sample(tmp_path, tok_dir, record, **overrides):
    """(ids, trained) of the single sample made from `record`: trained[t] says whether the
    loss counts the prediction of token t (read back from the rows' shifted targets)."""
    data = write_jsonl(tmp_path / "data.jsonl", [record])
    tok = load_tokenizer(tok_dir)
    s = settings(str(data), tok_dir, max_seq_len=256, packing=False, **overrides)
    rows = prepare_datasets(s, tok, log=lambda m: None).train
    assert len(rows) == 1
    n = int(np.count_nonzero(rows.segment_ids[0]))
    ids = rows.input_ids[0, :n]
    np.testing.assert_array_equal(rows.targets[0, : n - 1], ids[1:])  # next token, in the same segment
    assert rows.targets[0, n - 1] == 0 and rows.loss_weights[0, n - 1] == 0
    np.testing.assert_array_equal(rows.positions[0, :n], np.arange(n))
    trained = np.concatenate([[False], rows.loss_weights[0, : n - 1] > 0])
    return tok, ids.tolist(), trained.tolist()


def chat_ids(tok, messages, add_generation_prompt=False):
    return tok.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )


def expected_chat_mask(tok, messages, n_tokens):
    """Independent of character offsets: assistant turn i covers the tokens from the end of
    render(messages[:i], generation prompt) to the end of render(messages[:i+1])."""
    mask = [False] * n_tokens
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(chat_ids(tok, messages[:i], add_generation_prompt=True))
            end = len(chat_ids(tok, messages[: i + 1]))
            mask[start:end] = [True] * (end - start)
    return mask


def trained_text(tok, ids, trained):
    return tok.decode([t for t, m in zip(ids, trained) if m])


def test_text_trains_every_token_and_eos_with_pad_equal_eos(tmp_path, plain_dir):
    tok, ids, trained = one_sample(tmp_path, plain_dir, {"text": "the quick brown fox jumps over a lazy dog"})
    assert tok.pad_token_id == tok.eos_token_id
    expected = tok("the quick brown fox jumps over a lazy dog")["input_ids"] + [tok.eos_token_id]
    assert expected[0] == tok.bos_token_id
    assert ids == expected
    assert trained == [False] + [True] * (len(ids) - 1)  # the final EOS (== pad) is trained


def test_prompt_completion_without_template(tmp_path, plain_dir):
    record = {"prompt": "what is two plus four?\n", "completion": "six is the answer"}
    tok, ids, trained = one_sample(tmp_path, plain_dir, record)
    n_prompt = len(tok(record["prompt"])["input_ids"])
    assert ids == tok(record["prompt"] + record["completion"])["input_ids"] + [tok.eos_token_id]
    assert ids[:n_prompt] == tok(record["prompt"])["input_ids"]  # the boundary is a token boundary here
    assert trained == [False] * n_prompt + [True] * (len(ids) - n_prompt)
    assert trained_text(tok, ids, trained) == "six is the answer<|end_of_text|>"


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca_without_template_uses_the_documented_prompt(tmp_path, plain_dir, with_input):
    record = {"instruction": "translate into french", "input": "the cat sat on the mat" if with_input else "",
              "output": "le chat"}
    tok, ids, trained = one_sample(tmp_path, plain_dir, record)
    prompt = (ALPACA_WITH_INPUT if with_input else ALPACA_NO_INPUT).format(**record)
    n_prompt = len(tok(prompt)["input_ids"])
    assert ids == tok(prompt + record["output"])["input_ids"] + [tok.eos_token_id]
    assert trained == [False] * n_prompt + [True] * (len(ids) - n_prompt)
    assert trained_text(tok, ids, trained) == "le chat<|end_of_text|>"


def test_alpaca_system_replaces_the_preamble_without_template(tmp_path, plain_dir):
    record = {"instruction": "say hello", "output": "hello", "system": "you are helpful"}
    tok, ids, trained = one_sample(tmp_path, plain_dir, record)
    prompt = "you are helpful\n\n### Instruction:\nsay hello\n\n### Response:\n"
    assert ids == tok(prompt + "hello")["input_ids"] + [tok.eos_token_id]
    assert trained_text(tok, ids, trained) == "hello<|end_of_text|>"


def test_alpaca_with_llama3_template(tmp_path, llama3_dir):
    record = {"instruction": "translate into french", "input": "the cat", "output": "le chat", "system": "be brief"}
    tok, ids, trained = one_sample(tmp_path, llama3_dir, record)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "translate into french\n\nthe cat"},
        {"role": "assistant", "content": "le chat"},
    ]
    assert ids == chat_ids(tok, messages)
    assert ids[0] == tok.bos_token_id  # rendered by the template, not added twice
    assert trained == expected_chat_mask(tok, messages, len(ids))
    # <|eot_id|> is EOS-like (generation_config.json), so no extra EOS is appended.
    assert trained_text(tok, ids, trained) == "le chat<|eot_id|>"


def test_prompt_completion_with_chatml_template(tmp_path, chatml_dir):
    record = {"prompt": "capital of france?", "completion": "paris"}
    tok, ids, trained = one_sample(tmp_path, chatml_dir, record)
    messages = [{"role": "user", "content": "capital of france?"}, {"role": "assistant", "content": "paris"}]
    assert ids == chat_ids(tok, messages)
    assert tok.decode(ids[-2:]) == "<|im_end|>\n"
    expected = expected_chat_mask(tok, messages, len(ids))
    expected[-1] = False  # the newline after the end-of-turn token is not trained
    assert trained == expected
    assert trained_text(tok, ids, trained) == "paris<|im_end|>"


def test_sharegpt_appends_a_trained_eos_when_turns_do_not_end_with_one(tmp_path, chatml_pad_eos_dir):
    record = {"conversations": [
        {"from": "system", "value": "you are helpful"},
        {"from": "human", "value": "hello world"},
        {"from": "gpt", "value": "hello"},
    ]}
    tok, ids, trained = one_sample(tmp_path, chatml_pad_eos_dir, record)
    assert tok.pad_token_id == tok.eos_token_id
    messages = [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "hello"}]
    assert ids == chat_ids(tok, messages) + [tok.eos_token_id]
    assert trained == expected_chat_mask(tok, messages, len(ids) - 1) + [True]
    assert trained_text(tok, ids, trained) == "hello<|im_end|>\n<|endoftext|>"


def test_messages_multi_turn_trains_every_assistant_turn_only(tmp_path, llama3_dir):
    messages = [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "what is two plus four?"},
        {"role": "assistant", "content": "six"},
        {"role": "user", "content": "and one plus five?"},
        {"role": "assistant", "content": "also six"},
    ]
    tok, ids, trained = one_sample(tmp_path, llama3_dir, {"messages": messages})
    assert ids == chat_ids(tok, messages)
    assert trained == expected_chat_mask(tok, messages, len(ids))
    turns = [tok.decode([t]) for t, m in zip(ids, trained) if m]
    assert "".join(turns) == "six<|eot_id|>also six<|eot_id|>"


LLAMA32_DATED_SYSTEM = (  # Llama 3.2 Instruct's date handling, on the Llama 3 turns
    "{{- bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
    "{%- endif %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + date_string + '<|eot_id|>' }}"
    "{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def test_a_template_that_prints_todays_date_gives_the_same_rows_on_every_day(tmp_path, llama3_dir, monkeypatch):
    """Llama 3.2's template wrote the clock's date into every sample: rows changed with the day
    (a cold-cache resume was refused as other data), and a batch rendered across midnight had
    conversations and prefixes of different days (bad records)."""
    import datetime

    from transformers.utils import chat_template_utils

    class Clock:  # each call a day later: midnight between any two renders
        day = 0

        @classmethod
        def now(cls):
            cls.day += 1
            return datetime.datetime(2025, 3, 1) + datetime.timedelta(days=cls.day)

    monkeypatch.setattr(chat_template_utils, "datetime", Clock)
    tok = load_tokenizer(llama3_dir)
    tok.chat_template = LLAMA32_DATED_SYSTEM
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}] * 3)
    runs = [prepare_datasets(settings(data, llama3_dir), tok, log=lambda m: None) for _ in range(2)]
    assert runs[0].train.equals(runs[1].train) and runs[0].report.train.samples == 3
    row = runs[0].train.input_ids[0][runs[0].train.segment_ids[0] == 1]
    assert "Today Date: 26 Jul 2024" in tok.decode(row.tolist())


def test_llama3_template_without_generation_config_appends_eos(tmp_path):
    tok_dir = tmp_path / "tok"
    make_tokenizer(tok_dir, "llama3")  # eos <|end_of_text|>; <|eot_id|> is not known to end a turn
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    tok, ids, trained = one_sample(tmp_path, str(tok_dir), {"messages": messages})
    assert ids == chat_ids(tok, messages) + [tok.eos_token_id]
    assert trained_text(tok, ids, trained) == "world<|eot_id|><|end_of_text|>"


@pytest.fixture
def split_dirs(tmp_path):
    """A tokenizer directory without generation_config.json, and the model directory whose
    generation_config.json says <|eot_id|> ends a turn (data.tokenizer_path != model.hf_path)."""
    tok = make_tokenizer(tmp_path / "tok", "llama3")
    model = tmp_path / "model"
    model.mkdir()
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return str(tmp_path / "tok"), str(model)


def test_the_model_directorys_generation_config_ends_turns(tmp_path, split_dirs):
    tok_dir, model_dir = split_dirs
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    tok, ids, trained = one_sample(tmp_path, tok_dir, {"messages": messages}, model_path=model_dir)
    assert ids == chat_ids(tok, messages)  # no EOS appended: <|eot_id|> ends the turn
    assert trained == expected_chat_mask(tok, messages, len(ids))
    assert trained_text(tok, ids, trained) == "world<|eot_id|>"


def test_turn_ends_are_the_union_of_both_directories(tmp_path, split_dirs):
    tok_dir, model_dir = split_dirs
    tok = load_tokenizer(tok_dir)
    (tmp_path / "tok" / "generation_config.json").write_text(
        json.dumps({"eos_token_id": tok.convert_tokens_to_ids("<|im_end|>")}))
    names = lambda ids: sorted(tok.convert_ids_to_tokens(sorted(ids)))  # noqa: E731
    assert names(eos_token_ids(tok, model_dir, tok_dir)) == ["<|end_of_text|>", "<|eot_id|>", "<|im_end|>"]
    assert names(eos_token_ids(tok, "", tok_dir)) == ["<|end_of_text|>", "<|im_end|>"]


def test_the_cache_key_follows_the_model_directorys_turn_ends_not_its_name(tmp_path, split_dirs):
    tok_dir, model_dir = split_dirs
    data = write_jsonl(tmp_path / "data.jsonl", [{"messages": [{"role": "user", "content": "hello"},
                                                               {"role": "assistant", "content": "world"}]}])

    def cache_log(model_path):
        log = []
        s = settings(data, tok_dir, cache_dir=str(tmp_path / "cache"), model_path=model_path)
        prepare_datasets(s, load_tokenizer(tok_dir), log=log.append)
        return log[0]

    assert "cache miss" in cache_log(model_dir)
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    assert "cache hit" in cache_log(str(copy))  # same turn ends, another directory
    assert "cache miss" in cache_log("")  # <|eot_id|> no longer ends a turn


def test_conversation_ending_with_user_turn_gets_no_eos(tmp_path, llama3_dir):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
                {"role": "user", "content": "thanks"}]
    tok, ids, trained = one_sample(tmp_path, llama3_dir, {"messages": messages})
    assert ids == chat_ids(tok, messages)
    assert trained_text(tok, ids, trained) == "world<|eot_id|>"


def test_train_on_prompt_trains_everything(tmp_path, llama3_dir):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    tok, ids, trained = one_sample(tmp_path, llama3_dir, {"messages": messages}, train_on_prompt=True)
    assert ids == chat_ids(tok, messages)
    assert trained == [False] + [True] * (len(ids) - 1)


def test_forced_format_and_detection_by_keys(tmp_path, plain_dir):
    # A record with both "text" and "prompt"/"completion" is detected as prompt_completion ...
    record = {"text": "ignored", "prompt": "one ", "completion": "two"}
    tok, ids, trained = one_sample(tmp_path, plain_dir, record)
    # " two" is one token that starts in the prompt: a token overlapping the completion is trained.
    assert trained_text(tok, ids, trained) == " two<|end_of_text|>"
    # ... and data.format=text reads its "text" field instead.
    tok, ids, trained = one_sample(tmp_path, plain_dir, record, format="text")
    assert ids == tok("ignored")["input_ids"] + [tok.eos_token_id]
