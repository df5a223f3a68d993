"""When and how `jaxtune.distributed.init` starts multi-host JAX (the real thing runs in
test_multiprocess.py)."""

import os
import re
import subprocess
import sys

import jax
import pytest

from jaxtune import distributed
from jaxtune.errors import UserError
from run_helpers import ROOT

ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS",
       "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@pytest.fixture
def calls(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    seen = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    return seen


def test_a_single_host_initialises_nothing(calls):
    distributed.init()
    assert calls == []


def test_the_process_count_and_index_come_from_the_environment(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    distributed.init()
    assert calls == [{"num_processes": 4, "process_id": 3}]


def test_a_cluster_says_them_itself(calls, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "2")
    distributed.init()
    assert calls == [{"num_processes": None, "process_id": None}]


@pytest.mark.parametrize("env, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 must be in [0, JAX_NUM_PROCESSES=2)"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' must be an integer"),
])
def test_environment_mistakes_are_one_clear_error(calls, monkeypatch, env, message):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=re.escape(message)):
        distributed.init()
    assert calls == []


def test_a_process_count_without_a_coordinator_is_not_n_lone_runs(calls, monkeypatch):
    """Each would be process 0 of one and write the same workdir; JAX then asks for the address."""
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    distributed.init()
    assert calls == [{"num_processes": 2, "process_id": 1}]


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1"}, "set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "coordinator_address should be defined"),
])
def test_what_jax_cannot_start_with_is_one_clear_error(env, message):
    """JAX itself raises a bare ValueError. In a fresh process: JAX refuses to start multi-host
    once a backend exists, as one does in this test process."""
    script = ("from jaxtune import distributed\nfrom jaxtune.errors import UserError\n"
              "try:\n    distributed.init()\nexcept UserError as e:\n    print('UserError:', e)\n")
    clean = {k: v for k, v in os.environ.items() if k not in ENV}
    out = subprocess.run([sys.executable, "-c", script], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("UserError: ") and message in out.stdout, out.stdout


def test_jax_used_before_init_is_one_clear_error(calls, monkeypatch):
    def used_already(**kw):
        raise RuntimeError("jax.distributed.initialize() must be called before any JAX calls")

    monkeypatch.setattr(jax.distributed, "initialize", used_already)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(UserError, match="could not start multi-host JAX: jax.distributed.initialize"):
        distributed.init()
