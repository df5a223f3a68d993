"""Tiny tokenizers with stock-style chat templates, and data files, made inside the tests."""

from __future__ import annotations

import functools
import json
import os
import random

import pytest

# Stock templates, verbatim: neither has {% generation %} markers.
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (  # Qwen2-Instruct
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<pad>",
]
WORDS = (
    "the quick brown fox jumps over a lazy dog hello world what is answer question data model train token "
    "system user assistant you are helpful below instruction that describes task paired with input provides "
    "further context write response appropriately completes request capital of france paris two plus four "
    "translate into french cat sat on mat sun moon river mountain blue green red yellow one three five seven"
).split()
VOCAB_SIZE = 512  # the trained vocabulary is smaller; models in the tests use this size


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(600)]
    corpus += [" ".join(WORDS), "### Instruction:\n### Input:\n### Response:\n", "1 2 3 4 5 6 7 8 9 0 . , ? ! :"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=450, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() <= VOCAB_SIZE
    return tok.to_str()


def make_tokenizer(
    path,
    template: str | None = "llama3",
    eos: str = "<|end_of_text|>",
    pad: str | None = "<pad>",
    bos: str | None = "<|begin_of_text|>",
    generation_eos: tuple[str, ...] = (),
):
    """Saves a fast tokenizer to `path` and returns it loaded back with AutoTokenizer.

    `template`: "llama3", "chatml" or None; `bos` also makes add_special_tokens prepend it;
    `generation_eos` writes a generation_config.json with those tokens as eos_token_id.
    """
    import transformers
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(_trained_tokenizer_json())
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    chat_template = {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE, None: None}[template]
    kwargs = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, chat_template=chat_template, **{k: v for k, v in kwargs.items() if v is not None}
    )
    path = os.fspath(path)
    fast.save_pretrained(path)
    if generation_eos:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": [tok.token_to_id(t) for t in generation_eos]}, f)
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def write_jsonl(path, records) -> str:
    path = os.fspath(path)
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def settings(train_files, tokenizer_path, **overrides):
    from jaxtune.data import DataSettings

    base = dict(
        train_files=tuple(train_files) if not isinstance(train_files, str) else (train_files,),
        eval_files=(), format="auto", tokenizer_path=os.fspath(tokenizer_path), max_seq_len=64,
        packing=True, truncation="truncate", train_on_prompt=False, on_bad_record="error",
        eval_fraction=0.0, cache_dir="", seed=0,
    )
    base.update(overrides)
    return DataSettings(**base)


def trained_segments(rows, tokenizer) -> list[str]:
    """The decoded trained targets of each segment of each row: what the loss sees."""
    out = []
    for r in range(len(rows)):
        seg = rows.segment_ids[r]
        for s in sorted(set(seg.tolist()) - {0}):
            sel = (seg == s) & (rows.loss_weights[r] > 0)
            out.append(tokenizer.decode(rows.targets[r][sel].tolist()))
    return out


# Shared fixtures: import them into a test module to use them.
@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory):
    """Llama-3 style: eos <|end_of_text|>, turns end with <|eot_id|> (listed in generation_config.json)."""
    path = tmp_path_factory.mktemp("tok_llama3")
    make_tokenizer(path, "llama3", generation_eos=("<|end_of_text|>", "<|eot_id|>"))
    return str(path)


@pytest.fixture(scope="session")
def plain_dir(tmp_path_factory):
    """No chat template; BOS added by the tokenizer; pad == eos."""
    path = tmp_path_factory.mktemp("tok_plain")
    make_tokenizer(path, None, eos="<|end_of_text|>", pad="<|end_of_text|>")
    return str(path)
