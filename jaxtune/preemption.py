"""SIGTERM/SIGINT: stop at the next step boundary after a durable checkpoint; a second
signal exits at once. Outside training (start-up, the end) they exit at once."""

from __future__ import annotations

import contextlib
import os
import signal
import sys


class StopRequest:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            print(f"\nsecond signal {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True)
            _tell_the_other_processes(signum, " twice")
            os._exit(128 + signum)
        self.signal = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint at the end of this step, "
              "then exiting (send it again to exit at once)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signal is not None


class ExitOnSignal(StopRequest):
    """Before training starts there is nothing to save: SIGINT and SIGTERM end the process at
    once (the data cache and checkpoints are written atomically). Python's KeyboardInterrupt
    would not do: raised inside JAX's garbage-collection callback it is printed and ignored."""

    def _handle(self, signum, frame) -> None:
        _exit_now(signum, " before training started")


def exit_at_once_on_signals() -> None:
    """A launcher's first step, before its imports: until training installs its own handlers
    (and after it restores these), SIGINT and SIGTERM end the process at once. A Ctrl-C
    during `import jax` otherwise raised KeyboardInterrupt inside JAX's garbage-collection
    callback, which printed it and carried on: the whole run followed."""
    for sig in StopRequest.SIGNALS:
        signal.signal(sig, lambda signum, frame: _exit_now(signum))


def _exit_now(signum: int, when: str = "") -> None:
    print(f"\n{signal.Signals(signum).name} received{when}: exiting", file=sys.stderr, flush=True)
    _tell_the_other_processes(signum, when)
    os._exit(128 + signum)


def _tell_the_other_processes(signum: int, when: str) -> None:
    """In a job of several processes, the others would wait in a collective for this one
    (see `distributed.announce_stop`). Only if JAX is already in use: this module must not
    import it (a launcher installs these handlers before its imports)."""
    announce = getattr(sys.modules.get("jaxtune.distributed"), "announce_stop", None)  # None mid-import
    if announce is not None:
        with contextlib.suppress(Exception):  # nothing may keep this process from exiting
            announce(128 + signum, f"it received {signal.Signals(signum).name}{when}")
