"""Test environment: offline, CPU, 8 fake devices for sharding tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# The tests' models are tiny, so compiling their steps costs more than running them: LLVM's
# optimisations off (XLA's own HLO passes still run, so the programs are the same) took the
# suite from ~20 to ~17 minutes on 2 cores. Subprocesses inherit it unless a test sets XLA_FLAGS.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# One XLA compilation cache for the session, shared with the runs tests start as subprocesses:
# most tests train the same tiny models, whose steps every run compiled again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _XLA_CACHE = tempfile.mkdtemp(prefix="jaxtune-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
else:
    _XLA_CACHE = None

import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import types

import pytest


@pytest.fixture(scope="session")
def run_assets(tmp_path_factory):
    """A tiny model with the demo tokenizer, and small train/eval files, shared by e2e tests."""
    from run_helpers import make_demo_model, write_subset

    root = tmp_path_factory.mktemp("run_assets")
    return types.SimpleNamespace(
        model=make_demo_model(root / "model"),
        train=write_subset(root / "train.jsonl", 400),
        eval=write_subset(root / "eval.jsonl", 64, source="eval.jsonl"),
        cache=root / "cache",
    )


@pytest.fixture
def tiny(run_assets, tmp_path):
    """tiny(**overrides) -> the override dict of a few-second run in tmp_path/run."""
    from run_helpers import tiny_overrides

    def make(workdir=None, **kw):
        base = tiny_overrides(workdir or tmp_path / "run", run_assets.model, run_assets.train,
                              run_assets.eval, run_assets.cache)
        return {**base, **{k.replace("__", "."): v for k, v in kw.items()}}

    return make


def pytest_sessionfinish(session, exitstatus):
    if _XLA_CACHE:
        import shutil

        shutil.rmtree(_XLA_CACHE, ignore_errors=True)
