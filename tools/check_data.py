"""Checks training data before an expensive run: what would be trained, and what is wrong.

    python tools/check_data.py --data train.jsonl [--eval eval.jsonl] --tokenizer DIR [--max-seq-len 2048]
    python tools/check_data.py --config configs/demo.py [--show 3] [--out report.json]   # a recipe's data

Reports records per format, invalid records with their locations, exact and near
duplicates, the token-length distribution and how many samples would be truncated or
dropped, trained tokens per sample, samples with no trained token, empty fields,
train/eval overlap (contamination), and token ids beyond the model's vocabulary (when the
recipe's model or the tokenizer directory has a config.json). `--show K` prints K samples
with the trained tokens marked. Exit code: 0 clean or warnings only, 1 errors found, 2 the
check could not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jaxtune.errors import UserError, exit_on_user_error  # noqa: E402
from jaxtune.preemption import exit_at_once_on_signals  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="a recipe (configs/*.py) for the data files, tokenizer and data settings; "
                                    "flags override it")
    p.add_argument("--data", nargs="+", metavar="FILE", help="training files, globs or save_to_disk directories")
    p.add_argument("--eval", nargs="+", metavar="FILE", help="evaluation files (checked for overlap with training)")
    p.add_argument("--tokenizer", metavar="DIR", help="the model directory (or a tokenizer directory)")
    p.add_argument("--max-seq-len", type=int, help="default: the recipe's data.max_seq_len, else 1024")
    p.add_argument("--format", choices=("auto", "text", "prompt_completion", "alpaca", "sharegpt", "messages"))
    p.add_argument("--truncation", choices=("truncate", "drop"))
    p.add_argument("--eval-fraction", type=float, metavar="F",
                   help="held out of --data when there is no --eval (default: the recipe's, else 0.05)")
    p.add_argument("--train-on-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="train every token, not only completions (default: the recipe's, else no)")
    p.add_argument("--ngram", type=int, default=13, help="words in a passage that counts as contamination (13)")
    p.add_argument("--show", type=int, default=0, metavar="K", help="print K training samples, trained tokens marked")
    p.add_argument("--out", metavar="FILE", help="write the report as JSON")
    return p.parse_args(argv)


# The data settings this tool's flags set (DataSettings field -> flag); messages name the
# flags in place of the settings when there is no recipe (`in_flag_words`).
FLAGS = {"train_files": "--data", "eval_files": "--eval", "tokenizer_path": "--tokenizer",
         "max_seq_len": "--max-seq-len", "format": "--format", "truncation": "--truncation",
         "train_on_prompt": "--train-on-prompt", "eval_fraction": "--eval-fraction"}


def settings_from(args, config):
    from jaxtune.data import DataSettings

    base = DataSettings.from_config(config)
    given = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in FLAGS.items()}
    changes = {field: tuple(v) if isinstance(v, list) else v for field, v in given.items() if v is not None}
    settings = dataclasses.replace(base, **changes)
    if not settings.train_files:
        raise UserError("no training data: give --data FILE... or a --config whose data.train_files is set.")
    if not settings.tokenizer_path:
        raise UserError("no tokenizer: give --tokenizer DIR or a --config whose model.hf_path is set.")
    if not settings.model_path:  # without a recipe's model, the --tokenizer directory is the model's
        settings = dataclasses.replace(settings, model_path=settings.tokenizer_path)
    return settings


def model_vocab_size(model_dir: str) -> int | None:
    """The embedding count of the model the data is for; None without a config.json there."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            vocab = json.load(f).get("vocab_size")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}.") from None
    return vocab if isinstance(vocab, int) else None


def in_flag_words(text: str) -> str:
    for field, flag in FLAGS.items():
        text = re.sub(rf"(?<![\w.])data\.{field}\b", flag, text)
    return text


def main(argv=None) -> int:
    args = parse(argv)
    try:
        return check(args)
    except UserError as e:
        if args.config:  # the recipe's words
            raise
        raise UserError(in_flag_words(str(e))) from None


def check(args) -> int:
    if args.show < 0 or args.ngram < 1:
        raise UserError("--show must be >= 0 and --ngram >= 1.")
    if args.out:  # checked before the (long) check runs
        parent = os.path.dirname(os.path.abspath(args.out))
        if os.path.isdir(args.out) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise UserError(f"--out {args.out}: not a file in an existing, writable directory.")
    from jaxtune.config import defaults, expand_user_paths, load_recipe

    config = load_recipe(args.config) if args.config else defaults()
    expand_user_paths(config)  # `~` in the recipe's paths, as run.py expands them
    settings = settings_from(args, config)

    from jaxtune.data import load_tokenizer
    from jaxtune.data.quality import check_data, render_sample

    tokenizer = load_tokenizer(settings.tokenizer_path)
    vocab_size = model_vocab_size(settings.model_path)
    report, samples = check_data(settings, tokenizer, ngram=args.ngram, vocab_size=vocab_size)
    if not args.config:
        for finding in report.findings:
            finding.message = in_flag_words(finding.message)
    batch = config.train.global_batch_size
    if args.config and report.train.packed_rows < batch:  # what run.py would refuse after loading the model
        from jaxtune.data.loader import too_few_rows
        from jaxtune.data.quality import Finding

        report.findings.append(Finding(
            "error", "fewer_rows_than_a_batch", report.train.packed_rows,
            too_few_rows(report.train.packed_rows, batch, 1, settings.packing)))
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    for sample, note in samples[: args.show]:
        trained = sample.num_trained
        print(f"--- {sample.location} ({len(sample.ids)} tokens, {trained} trained"
              f"{', ' + note if note else ''}{', marked in green' if color else ', marked [[like this]]'}) ---")
        print(render_sample(tokenizer, sample, color=color))
        print()
    print(report.summary())
    if args.out:
        try:
            with open(args.out, "w") as f:
                json.dump(report.to_json(), f, indent=1)
        except OSError as e:
            raise UserError(f"cannot write --out {args.out} ({e.strerror or e}).") from None
        print(f"report written to {args.out}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    exit_at_once_on_signals()  # a Ctrl-C during the imports in main() ends it, as in run.py
    with exit_on_user_error():
        sys.exit(main())
