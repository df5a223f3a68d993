"""Data-pipeline throughput: tokenize and pack N generated chat samples, then start again.

    python scripts/bench_data.py [--samples 20000] [--max-seq-len 2048] [--workdir DIR]

Makes a byte-level BPE tokenizer (8k vocabulary, trained on the generated text) with the
Llama 3 Instruct chat template, writes N multi-turn conversations as JSONL, and times
`prepare_datasets` twice: the first call reads, renders, tokenizes, masks and packs; the
second must hit the cache. The target is under 30 s for 20k samples on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def make_words(rng: random.Random, n: int = 3000) -> list[str]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    return ["".join(rng.choices(letters, weights, k=rng.randint(1, 10))) for _ in range(n)]


def sentence(rng: random.Random, words: list[str], n: int) -> str:
    out = " ".join(rng.choices(words, k=n))
    return out[0].upper() + out[1:] + rng.choice([".", "?", "!", ".\n\n"])


def conversations(n: int, seed: int = 0):
    rng = random.Random(seed)
    words = make_words(rng)
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": sentence(rng, words, rng.randint(5, 20))})
        for _ in range(rng.choice([1, 1, 2, 3])):
            messages.append({"role": "user", "content": sentence(rng, words, rng.randint(8, 60))})
            answer = " ".join(sentence(rng, words, rng.randint(5, 25)) for _ in range(rng.randint(1, 8)))
            messages.append({"role": "assistant", "content": answer})
        yield {"messages": messages}


def make_tokenizer(path: str, corpus_file: str):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        with open(corpus_file) as f:
            for i, line in enumerate(f):
                if i >= 3000:
                    break
                yield " ".join(m["content"] for m in json.loads(line)["messages"])

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=8192, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    ))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE,
    )
    fast.save_pretrained(path)


def settings_for(workdir: str, max_seq_len: int):
    from jaxtune.data import DataSettings

    return DataSettings(
        train_files=(os.path.join(workdir, "chat.jsonl"),), eval_files=(), format="auto",
        tokenizer_path=os.path.join(workdir, "tokenizer"), max_seq_len=max_seq_len, packing=True,
        cache_dir=os.path.join(workdir, "cache"),
    )


def timed_prepare(workdir: str, max_seq_len: int):
    """prepare_datasets and its wall time (the tokenizer is loaded before the clock starts)."""
    from jaxtune.data import load_tokenizer, prepare_datasets

    settings = settings_for(workdir, max_seq_len)
    tokenizer = load_tokenizer(settings.tokenizer_path)
    t0 = time.perf_counter()
    data = prepare_datasets(settings, tokenizer, log=lambda m: print("  " + m))
    return data, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--restart", action="store_true", help=argparse.SUPPRESS)  # the second start
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.restart:
        data, seconds = timed_prepare(args.workdir, args.max_seq_len)
        print(f"second start (a new process): prepare_datasets {seconds:.2f} s, "
              f"cache {'hit' if data.report.cache_hit else 'MISS'}")
        sys.exit(0 if data.report.cache_hit else 1)

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    os.makedirs(workdir, exist_ok=True)
    shutil.rmtree(os.path.join(workdir, "cache"), ignore_errors=True)
    data_file = os.path.join(workdir, "chat.jsonl")
    t0 = time.perf_counter()
    with open(data_file, "w") as f:
        for record in conversations(args.samples):
            f.write(json.dumps(record) + "\n")
    make_tokenizer(os.path.join(workdir, "tokenizer"), data_file)
    print(f"setup (data + tokenizer training, not timed below): {time.perf_counter() - t0:.1f} s")

    first, cold = timed_prepare(workdir, args.max_seq_len)
    print(first.report.summary())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"first start: {args.samples:,} chat samples on {cores} cores in {cold:.1f} s "
          f"({args.samples / cold:,.0f} samples/s, {first.report.train.tokens / cold:,.0f} tokens/s)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--restart", "--workdir", workdir,
                           "--max-seq-len", str(args.max_seq_len)])
    print(f"second start, whole process (imports included): {time.perf_counter() - t0:.1f} s")
    print(f"workdir: {workdir}")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
