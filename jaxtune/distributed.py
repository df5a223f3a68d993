"""Multi-host initialisation and the few collectives the host loop needs.

On a single host nothing is initialised. On TPU pods, SLURM and GPU clusters with a
coordinator (JAX_COORDINATOR_ADDRESS or SLURM with several tasks), `jax.distributed`
is initialised before any device is touched. Where no cluster tells JAX the number of
processes and this one's index (a plain GPU cluster, or several processes on one machine),
JAX_NUM_PROCESSES and JAX_PROCESS_ID say them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import traceback

import jax
import numpy as np

from jaxtune.errors import UserError, message_codes, message_from_codes

_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def init() -> None:
    count, index = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
    wanted = (any(os.environ.get(v) for v in _MULTIHOST_ENV) or int(os.environ.get("SLURM_NTASKS", "1")) > 1
              or (count or 1) > 1)  # a process count without a coordinator must not mean N lone runs
    if not wanted or jax.distributed.is_initialized():
        return
    if (count is None) != (index is None):
        raise UserError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither (to let the cluster say them).")
    if count is not None and not 0 <= index < count:
        raise UserError(f"JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={count}).")
    try:
        jax.distributed.initialize(num_processes=count, process_id=index)
    except ValueError as e:  # no cluster detected to fill in what the environment left out
        raise UserError(
            f"could not start multi-host JAX ({e}); outside SLURM, TPU pods and other clusters JAX detects, "
            "set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID."
        ) from None
    except RuntimeError as e:  # JAX was used before this call (a script that touched devices first)
        raise UserError(f"could not start multi-host JAX: {e}") from None


@contextlib.contextmanager
def exit_promptly_on_failure():
    """Around a launcher's work. With several processes, a process that fails (an error, or a
    collective that failed because another process died) reports it and exits at once:
    leaving through Python's exit ran jax.distributed's shutdown, which waits at a barrier
    for every process, and when one had been killed that lasted ~90 s and ended in SIGABRT
    with a native stack dump. With one process, nothing changes."""
    try:
        yield
    except BaseException as e:
        if not jax.distributed.is_initialized():
            raise
        code = 1
        if isinstance(e, SystemExit):  # a user error, already reported
            code = e.code if isinstance(e.code, int) else 1
        else:
            traceback.print_exc()
            print(f"error: process {jax.process_index()} of {jax.process_count()} failed; exiting without waiting "
                  "for the others (if another process stopped first, rerun the same command on every host to "
                  "resume from the last checkpoint).", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} must be an integer.") from None


def is_main() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather(value) -> np.ndarray:
    """`value` from every process, stacked along a new first axis in process order."""
    if jax.process_count() == 1:
        return np.asarray([value])
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def global_min(value: int) -> int:
    return int(gather(value).min())


def global_max(value: int) -> int:
    return int(gather(value).max())


def combined_digest(digest: bytes) -> str:
    """One hex digest of every process's `digest`, in process order (the same on every process)."""
    gathered = gather(np.frombuffer(digest, np.uint8))
    return hashlib.sha256(np.ascontiguousarray(gathered, np.uint8).tobytes()).hexdigest()[:32]


def any_and_sum(flag: bool, count: int) -> tuple[bool, int]:
    """(any process's flag, the sum of every process's count) in one collective."""
    gathered = gather(np.asarray([int(bool(flag)), int(count)], np.int64)).reshape(-1, 2)
    return bool(gathered[:, 0].any()), int(gathered[:, 1].sum())


def first_message(message: str | None) -> str | None:
    """The first process's (in process order) non-empty `message`, on every process: a check
    that only one process makes (a login) stops all of them with its words, together."""
    for codes in gather(message_codes(message)):
        if (found := message_from_codes(codes)) is not None:
            return found
    return None
