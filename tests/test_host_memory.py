"""The host allocator setting that `run.py` and `tools/bench.py` apply first thing."""

import os
import subprocess
import sys

import pytest

from jaxtune import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, writes and frees 64 MiB with malloc, then counts the page faults of writing a
# second such block (numpy would ask for huge pages and hide the effect).
PROBE = """
import ctypes, resource
from jaxtune.host_memory import keep_large_allocations_in_heap
print("applied", keep_large_allocations_in_heap())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20
first = libc.malloc(size); ctypes.memset(first, 1, size); libc.free(first)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
second = libc.malloc(size); ctypes.memset(second, 1, size)
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

def _probe(choice):
    env = dict(os.environ, JAXTUNE_HOST_MALLOC=choice, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    fields = dict(line.split() for line in out.splitlines())
    return fields["applied"] == "True", int(fields["faults"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_freed_large_buffers_are_reused_without_page_faults():
    applied, faults = _probe("heap")
    assert applied
    assert faults < 1000  # the freed 64 MiB is reused: its 16,384 pages are already mapped
    applied, faults = _probe("system")
    assert not applied
    assert faults > 10000  # glibc's default maps fresh pages for the second buffer


def test_unknown_setting_is_refused(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_VAR, "jemalloc")
    with pytest.raises(ValueError, match="JAXTUNE_HOST_MALLOC"):
        host_memory.keep_large_allocations_in_heap()
