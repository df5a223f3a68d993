"""Back large host buffers with transparent huge pages, so a train step does not page-fault
its buffers in 4 KiB at a time.

glibc's malloc serves every block over 32 MiB with a fresh `mmap` and unmaps it on free,
and XLA:CPU allocates a step's large buffers anew each step: the bench's step took
~111,000 minor page faults (435 MiB of 4 KiB pages, each mapped and zeroed by the kernel).
With glibc's `glibc.malloc.hugetlb=1` tunable those mappings ask for 2 MiB pages, and the
faults drop to ~600 per step; on `tools/bench.py` the step ran 8-12% faster. (Keeping big
blocks in one malloc arena also removes the faults, but made tokenization 1.7x slower.)

A tunable is read when the process starts, so `reexec_with_huge_pages()` restarts the
current command (same PID, same arguments) with it set; `run.py` and `tools/bench.py` call
it before anything else. It does nothing where it cannot help: off Linux, under glibc
older than 2.35, when the kernel's transparent huge pages are `always` (already in use)
or `never`, and on GPU and TPU hosts (`JAX_PLATFORMS` naming another platform first, or,
when it is unset, a `/dev/nvidia*` or `/dev/accel*` device), where the step's buffers live
in device memory.
`JAXTUNE_HOST_MALLOC=system` turns it off.
"""

from __future__ import annotations

import glob
import os
import sys

from jaxtune.errors import UserError

ENV_VAR = "JAXTUNE_HOST_MALLOC"
TUNABLE = "glibc.malloc.hugetlb=1"
RESTARTED = "JAXTUNE_HOST_MALLOC_RESTARTED"  # set in the restarted process
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (ValueError, OSError, AttributeError):
        return None


def _thp_mode() -> str | None:
    """The kernel's transparent huge page mode: 'always', 'madvise' or 'never'."""
    try:
        with open(THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _accelerator_host() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:  # JAX takes the first platform it finds, in this order
        return platforms.split(",")[0].strip() != "cpu"
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*"))


def huge_pages_would_help() -> bool:
    """Whether the tunable is needed and honoured here (see the module docstring)."""
    choice = os.environ.get(ENV_VAR, "huge")
    if choice not in ("huge", "system"):
        raise UserError(f"{ENV_VAR} must be 'huge' or 'system', not {choice!r}.")
    version = _glibc_version()
    return (
        choice == "huge" and sys.platform.startswith("linux")
        and version is not None and version >= (2, 35) and _thp_mode() == "madvise" and not _accelerator_host()
    )


def reexec_with_huge_pages() -> None:
    """Restart this Python command with `GLIBC_TUNABLES` asking for huge pages, if useful.

    Returns normally when nothing is to be done (including in the restarted process, which
    finds the tunable set); otherwise it does not return.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or os.environ.get(RESTARTED) or not huge_pages_would_help():
        return  # RESTARTED: glibc may erase GLIBC_TUNABLES (secure-exec), which must not mean a loop
    if sys.argv[0] in ("", "-") or sys.flags.interactive:
        return  # a script read from stdin or a REPL cannot be run again
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, TUNABLE) if t), **{RESTARTED: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
