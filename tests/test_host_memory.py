"""The huge-page restart that `run.py` and `tools/bench.py` do first thing."""

import os
import subprocess
import sys

import pytest

from jaxtune import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Restarts itself if useful, then counts the page faults of writing a fresh 64 MiB malloc block.
PROBE = """
import ctypes, os, resource, sys
from jaxtune.host_memory import reexec_with_huge_pages
print("start", os.getpid(), sys.argv[1:], flush=True)
reexec_with_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
size = 64 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size); ctypes.memset(block, 1, size)
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("tunables", os.environ.get("GLIBC_TUNABLES", ""))
"""


def _probe(choice):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(JAXTUNE_HOST_MALLOC=choice, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE, "an-argument"], env=env, capture_output=True,
                         text=True, check=True).stdout
    lines = out.splitlines()
    starts = [line for line in lines if line.startswith("start")]
    faults = int(next(line for line in lines if line.startswith("faults")).split()[1])
    tunables = next(line for line in lines if line.startswith("tunables")).split()[1:]
    return starts, faults, tunables


@pytest.mark.skipif(not host_memory.huge_pages_would_help(),
                    reason="needs Linux, glibc >= 2.35 and transparent huge pages in 'madvise' mode")
def test_restart_with_huge_pages_removes_page_faults():
    starts, faults, tunables = _probe("huge")
    # One restart, same process id and arguments; the restarted process does not restart again.
    assert len(starts) == 2 and starts[0] == starts[1]
    assert tunables == [host_memory.TUNABLE]
    assert faults < 2000  # 2 MiB pages: 64 MiB is 32 of them (plus a few 4 KiB ones)

    starts, faults, tunables = _probe("system")
    assert len(starts) == 1 and tunables == []
    assert faults > 10000  # 16,384 pages of 4 KiB


def test_unknown_setting_is_one_line_and_exit_2():
    env = dict(os.environ, JAXTUNE_HOST_MALLOC="jemalloc")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run.py")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "JAXTUNE_HOST_MALLOC must be 'huge' or 'system'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["restarted_before", "stdin_script", "repl"])
def test_no_restart_where_it_could_loop_or_lose_the_script(case, monkeypatch):
    """glibc erases GLIBC_TUNABLES for secure-exec programs, so the restarted process must know
    it was restarted from a variable of ours; a script read from stdin or a REPL cannot rerun."""
    monkeypatch.setattr(host_memory, "huge_pages_would_help", lambda: True)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(host_memory.RESTARTED, raising=False)
    calls = []
    monkeypatch.setattr(host_memory.os, "execve", lambda *a: calls.append(a))
    host_memory.reexec_with_huge_pages()
    assert len(calls) == 1 and calls[0][2][host_memory.RESTARTED] == "1"  # the usual case restarts
    calls.clear()
    if case == "restarted_before":
        monkeypatch.setenv(host_memory.RESTARTED, "1")
    elif case == "stdin_script":
        monkeypatch.setattr(host_memory.sys, "argv", ["-"])
    else:
        monkeypatch.setattr(host_memory.sys, "flags", type("Flags", (), {"interactive": 1})())
    host_memory.reexec_with_huge_pages()
    assert calls == []


@pytest.mark.parametrize("platforms, devices, helps", [
    ("", [], True), ("cpu", [], True), ("cuda", [], False), ("tpu", [], False), ("cuda,cpu", [], False),
    ("", ["/dev/nvidia0"], False), ("", ["/dev/accel0"], False), ("cpu", ["/dev/nvidia0"], True),
])
def test_no_restart_on_gpu_and_tpu_hosts(platforms, devices, helps, monkeypatch):
    """There the step's buffers live in device memory: a restart would only cost a start-up."""
    monkeypatch.setattr(host_memory, "_glibc_version", lambda: (2, 35))
    monkeypatch.setattr(host_memory, "_thp_mode", lambda: "madvise")
    monkeypatch.setattr(host_memory.sys, "platform", "linux")
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: [d for d in devices if d.startswith(pattern[:-6])])
    assert host_memory.huge_pages_would_help() is helps
