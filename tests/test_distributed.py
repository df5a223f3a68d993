"""When and how `jaxtune.distributed.init` starts multi-host JAX (the real thing runs in
test_multiprocess.py)."""

import re

import jax
import pytest

from jaxtune import distributed
from jaxtune.errors import UserError

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


def test_no_cluster_to_fill_in_the_count_is_one_clear_error(monkeypatch):
    """JAX itself raises a bare ValueError ("Number of processes must be defined.")."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    with pytest.raises(UserError, match="set JAX_COORDINATOR_ADDRESS .* JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        distributed.init()
