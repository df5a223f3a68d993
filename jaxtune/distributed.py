"""Multi-host initialisation and the few collectives the host loop needs.

On a single host nothing is initialised. On TPU pods, SLURM and GPU clusters with a
coordinator (JAX_COORDINATOR_ADDRESS or SLURM with several tasks), `jax.distributed`
is initialised before any device is touched. Where no cluster tells JAX the number of
processes and this one's index (a plain GPU cluster, or several processes on one machine),
JAX_NUM_PROCESSES and JAX_PROCESS_ID say them.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import sys
import threading
import time
import traceback

import jax
import numpy as np

from jaxtune import errors
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
    _watch_for_stopped_processes()


# A process that stops (`exit_promptly_on_failure`) says so in the coordination service's
# key-value store; the others, which would wait in their next collective until the service
# noticed the missing heartbeats (~100 s) and then abort with a native stack dump, read it
# there and exit at once with its message.
_STOPPED = "jaxtune/stopped/"  # + process index -> "exit code\nmessage"
_LEAVING = "jaxtune/leaving/"  # + process index: has read a stop, or is stopping itself
_POLL_SECONDS = 0.5
_COORDINATOR_WAIT_SECONDS = 5.0
_stopping = threading.Event()  # this process is reporting its own stop: the watcher stands down


def _client():
    """The coordination service's client (JAX has no public API for its key-value store);
    None where this JAX keeps it elsewhere, and then processes wait as JAX makes them."""
    jax_distributed = sys.modules.get("jax._src.distributed")  # never imported here: a signal handler calls this
    return getattr(getattr(jax_distributed, "global_state", None), "client", None)


def _process_index() -> int:
    """From jax.distributed's own record (when `_client` found one): `jax.process_index()` may
    start a backend, which a signal handler must not do."""
    return sys.modules["jax._src.distributed"].global_state.process_id


def _process_count() -> int:
    return sys.modules["jax._src.distributed"].global_state.num_processes


def _entries(client, directory: str) -> dict[int, str]:
    """{process index: value} of the keys under `directory` (`_STOPPED`, `_LEAVING`)."""
    return {int(key.rsplit("/", 1)[1]): value for key, value in client.key_value_dir_get(directory)}


def _watch_for_stopped_processes() -> None:
    client = _client()
    if client is None or _process_count() == 1:
        return
    me, count = _process_index(), _process_count()

    def watch():
        while not _stopping.wait(_POLL_SECONDS):
            try:
                stopped = sorted((k, value) for k, value in _entries(client, _STOPPED).items() if k != me)
            except Exception:  # noqa: BLE001 - the service is gone: JAX's own handling follows
                return
            if stopped and not _stopping.is_set():
                k, value = stopped[0]
                code, _, message = value.partition("\n")
                with contextlib.suppress(Exception):
                    client.key_value_set(f"{_LEAVING}{me}", "read")
                print(f"error: process {k} of {count} stopped: {message}", file=sys.stderr)
                sys.stdout.flush()
                sys.stderr.flush()
                _let_the_others_read(client)
                os._exit(int(code))

    watcher = threading.Thread(target=watch, name="jaxtune-watch-stopped-processes", daemon=True)
    watcher.start()

    def stop_watching():  # before JAX's own exit handler (registered earlier, so run later) shuts the client
        _stopping.set()  # a daemon thread still inside the client's C++ call at interpreter exit aborts it
        watcher.join(timeout=5)

    atexit.register(stop_watching)


def announce_stop(code: int, message: str) -> None:
    """Tells the other processes this one stops; process 0, which hosts the coordination
    service, then gives them a moment to read it before the service goes with it."""
    _stopping.set()
    client = _client()
    if client is None:  # one process, or jax.distributed not started (yet)
        return
    me = _process_index()
    try:
        client.key_value_set(f"{_STOPPED}{me}", f"{code}\n{message}")
        client.key_value_set(f"{_LEAVING}{me}", "stopping")
    except Exception:  # noqa: BLE001 - best effort: the exit follows either way
        return
    _let_the_others_read(client)


def _let_the_others_read(client) -> None:
    """On process 0, which hosts the coordination service: waits (up to a few seconds) until
    every other process has read a stop or is stopping itself. Exiting at once took the
    service away from processes that had not polled yet, which then aborted."""
    if _process_index() != 0:
        return
    others = set(range(1, _process_count()))
    deadline = time.monotonic() + _COORDINATOR_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            if others <= _entries(client, _LEAVING).keys():
                return
        except Exception:  # noqa: BLE001 - best effort: the exit follows either way
            return
        time.sleep(0.05)


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
        _stopping.set()  # its own report, not another process's, is this process's last word
        code = 1
        if isinstance(e, SystemExit):  # a user error, already reported
            code = e.code if isinstance(e.code, int) else 1
            message = errors.last_reported or f"it exited with status {code}"
        else:
            traceback.print_exc()
            print(f"error: process {jax.process_index()} of {jax.process_count()} failed; exiting without waiting "
                  "for the others (if another process stopped first, rerun the same command on every host to "
                  "resume from the last checkpoint).", file=sys.stderr)
            message = f"it failed ({type(e).__name__}); its log has the traceback"
        sys.stdout.flush()
        sys.stderr.flush()
        announce_stop(code, message)
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
