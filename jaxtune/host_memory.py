"""Keep large host buffers in glibc's heap instead of mapping fresh pages for each one.

glibc's malloc serves every allocation above 32 MiB (and many above 128 KiB) with a new
`mmap` and unmaps it on free. XLA:CPU allocates a step's large buffers anew each step, so
every step page-faults them in again: the kernel zeroes and maps each 4 KiB page before
the first write. On the 2-core reference machine a 48 MiB elementwise op took 16 ms
instead of 3.5 ms, and the fp32 train step of `tools/bench.py` ran 8-12% faster with the
settings below (torch's step did not change).

The settings: one malloc arena (XLA's worker threads would otherwise get per-thread heaps,
which cannot hold buffers over 64 MiB and fall back to `mmap`), no `mmap` for large
blocks, and no returning of freed memory at the heap's top to the kernel. The cost is that
the process keeps its peak host memory until it exits, as a caching allocator does.

Call `keep_large_allocations_in_heap()` before JAX creates its threads (`run.py` and
`tools/bench.py` do it first thing). `JAXTUNE_HOST_MALLOC=system` leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

ENV_VAR = "JAXTUNE_HOST_MALLOC"


def keep_large_allocations_in_heap() -> bool:
    """Apply the settings above; returns whether they were applied.

    Nothing happens off Linux, with a C library other than glibc (no `mallopt`), or when
    the environment variable JAXTUNE_HOST_MALLOC is `system`.
    """
    choice = os.environ.get(ENV_VAR, "heap")
    if choice not in ("heap", "system"):
        raise ValueError(f"{ENV_VAR} must be 'heap' or 'system', not {choice!r}")
    if choice == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(param, value) == 1 for param, value in settings)
