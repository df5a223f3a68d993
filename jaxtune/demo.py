"""The demo: a tiny Llama with a real tokenizer and chat template, made deterministically.

`ensure_demo_model(dir)` writes, on first use, a Hugging Face Llama directory (config,
safetensors, tokenizer with a Llama-3-style chat template, generation_config.json) that
transformers loads as is. The instruction data (`data/demo/*.jsonl`, shipped in the repo)
are small list puzzles with one right answer (reverse, sort, count, max), so token
accuracy on the answers shows what the model learned.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

from jaxtune.errors import UserError

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MODEL_SHAPE = dict(
    vocab_size=384, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, rope_theta=500000.0, max_position_embeddings=512,
    tie_word_embeddings=True, rms_norm_eps=1e-5,
)
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rock"]
TASKS = ("reverse", "sort", "count", "max")


def make_example(rng: random.Random) -> dict:
    task = rng.choice(TASKS)
    n = rng.randint(3, 6)
    if task in ("sort", "max"):
        items = [str(rng.randint(0, 99)) for _ in range(n)]
    else:
        items = [rng.choice(WORDS) for _ in range(n)]
    if task == "reverse":
        prompt, answer = f"Reverse the list: {' '.join(items)}", " ".join(reversed(items))
    elif task == "sort":
        prompt, answer = f"Sort the numbers: {' '.join(items)}", " ".join(sorted(items, key=int))
    elif task == "count":
        word = rng.choice(items)
        prompt, answer = f"How many times does {word} appear in: {' '.join(items)}", str(items.count(word))
    else:
        prompt, answer = f"What is the largest number in: {' '.join(items)}", str(max(items, key=int))
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def write_dataset(out_dir: str, train: int = 6000, eval: int = 300, seed: int = 1234) -> None:
    """Regenerates data/demo/{train,eval}.jsonl (the shipped files came from this).

    Every prompt is unique, so eval measures generalisation, not recall of train lines
    (tools/check_data.py finds no duplicates and no contamination).
    """
    rng = random.Random(seed)
    try:
        _write_dataset(out_dir, train, eval, rng)
    except OSError as e:
        raise UserError(f"cannot write the demo data in {out_dir} ({e.strerror or e}).") from None


def _write_dataset(out_dir: str, train: int, eval: int, rng: random.Random) -> None:
    os.makedirs(out_dir, exist_ok=True)
    seen: set[str] = set()
    for name, n in (("train", train), ("eval", eval)):
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
            written = 0
            while written < n:
                example = make_example(rng)
                prompt = example["messages"][0]["content"]
                if prompt in seen:
                    continue
                seen.add(prompt)
                f.write(json.dumps(example) + "\n")
                written += 1


def _corpus(data_dir: str):
    for name in ("train.jsonl", "eval.jsonl"):
        with open(os.path.join(data_dir, name)) as f:
            for line in f:
                for m in json.loads(line)["messages"]:
                    yield f"{m['role']}\n\n{m['content']}"


def build_tokenizer(data_dir: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL_SHAPE["vocab_size"], special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(data_dir), trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>", chat_template=CHAT_TEMPLATE, model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )


def build_model_dir(out_dir: str, data_dir: str, seed: int = 0) -> None:
    """The tokenizer is trained on the demo data, so the data must be there."""
    for name in ("train.jsonl", "eval.jsonl"):
        if not os.path.isfile(os.path.join(data_dir, name)):
            raise UserError(f"the demo data {os.path.join(data_dir, name)} is missing; restore it from git "
                            "(git checkout data/demo) or regenerate it with tools/make_demo.py --data.")
    import jax
    from flax import nnx

    from jaxtune.models.hf_io import save_pretrained
    from jaxtune.models.llama import Llama, LlamaConfig

    tokenizer = build_tokenizer(data_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig.from_hf_dict({
        **MODEL_SHAPE, "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": [ids["<|eot_id|>"], ids["<|end_of_text|>"]], "pad_token_id": ids["<|end_of_text|>"],
    })
    model = Llama(config, rngs=nnx.Rngs(seed))
    params = jax.device_get(nnx.as_pure(nnx.split(model)[1]))
    save_pretrained(params, config, out_dir)
    tokenizer.save_pretrained(out_dir)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_id),
                  "pad_token_id": config.pad_token_id, "do_sample": False}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)


def ensure_demo_model(out_dir: str, data_dir: str) -> str:
    """Builds the demo model directory once (atomically); returns its path."""
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} exists and is not a directory; the demo model is a directory.")
    if os.path.isdir(out_dir) and os.listdir(out_dir):  # checked first: the build takes a while
        raise UserError(f"{out_dir} exists and is not a demo model (no config.json); name a new or empty directory.")
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".demo-model-")
    except OSError as e:
        raise UserError(f"cannot write the demo model under {parent} ({e.strerror or e}).") from None
    try:
        build_model_dir(tmp, data_dir)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process (a second command, another host) finished first
            if not os.path.isfile(os.path.join(out_dir, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
