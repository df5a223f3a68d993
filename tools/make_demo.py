"""Builds the demo model (tiny random Llama + tokenizer) and, with --data, regenerates the data.

    python tools/make_demo.py [--out demo_assets/model] [--data]
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxtune.demo import ensure_demo_model, write_dataset  # noqa: E402
from jaxtune.errors import exit_on_user_error  # noqa: E402
from jaxtune.preemption import exit_at_once_on_signals  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "demo_assets", "model"),
                   help="the model directory to write (default: demo_assets/model)")
    p.add_argument("--data", action="store_true", help="regenerate data/demo/*.jsonl first")
    args = p.parse_args()
    data_dir = os.path.join(ROOT, "data", "demo")
    if args.data:
        write_dataset(data_dir)
    print(ensure_demo_model(args.out, data_dir))


if __name__ == "__main__":
    exit_at_once_on_signals()  # a Ctrl-C during the imports in main() ends it, as in run.py
    with exit_on_user_error():
        main()
