"""End-to-end runs on a tiny model: configs, recipes on disk, subprocesses."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(ROOT, "data", "demo")


def make_demo_model(path) -> str:
    """The demo's tokenizer and model shape, with fresh random weights, in `path`."""
    from jaxtune.demo import build_model_dir

    build_model_dir(str(path), DEMO_DATA)
    return str(path)


def write_subset(path, n: int, start: int = 0, source: str = "train.jsonl") -> str:
    with open(os.path.join(DEMO_DATA, source)) as f:
        lines = f.readlines()[start:start + n]
    with open(path, "w") as f:
        f.writelines(lines)
    return str(path)


def tiny_overrides(workdir, model_dir, train_file, eval_file, cache_dir) -> dict:
    """A run of a few seconds: 8 rows of 64 tokens a step, eval and saves every few steps."""
    return {
        "workdir": str(workdir),
        "model.hf_path": model_dir,
        "model.compute_dtype": "float32",
        "model.remat": "none",
        "data.train_files": (train_file,),
        "data.eval_files": (eval_file,),
        "data.max_seq_len": 64,
        "data.cache_dir": str(cache_dir),
        "train.global_batch_size": 8,
        "train.max_steps": 12,
        "train.log_every": 1,
        "train.eval_every": 4,
        "train.save_every": 4,
        "optimizer.lr": 3e-3,
        "optimizer.warmup_steps": 2,
        "optimizer.weight_decay": 0.01,
        "logging.progress_bar": False,
    }


def make_config(overrides: dict):
    from jaxtune.config import defaults

    c = defaults()
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return c


def write_recipe(path, overrides: dict) -> str:
    """A recipe file for run.py that sets these keys on the defaults (with `make_config`)."""
    body = textwrap.dedent(f"""
        import sys

        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from run_helpers import make_config


        def get_config():
            return make_config({overrides!r})
    """)
    with open(path, "w") as f:
        f.write(body)
    return str(path)


def run_py(*args, env=None, timeout=300, **popen):
    cmd = [sys.executable, os.path.join(ROOT, "run.py"), *map(str, args)]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT, **popen)


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(history) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in history if r.get("loss") is not None}


def assert_trees_equal(a, b, atol=0.0):
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def tensorboard_scalars(workdir, tag) -> list[tuple[int, float]]:
    """(step, value) of every `tag` scalar in the run's event files (TFRecord framing)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents*"))):
        data, i = open(path, "rb").read(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
            i += 12 + n + 4
    return sorted(out)
