"""User-facing errors: one clear sentence, a non-zero exit, no traceback.

Library code raises `UserError` for anything the user can fix (a bad config key, a
missing file, a malformed record). Front ends (`run.py`, `tools/`) catch it with
`exit_on_user_error` and print only the message. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

MESSAGE_BYTES = 2048  # of a message sent to every process (`message_codes`)


class UserError(Exception):
    """An error the user can fix; its message is the whole report."""

    exit_code = 2


# The last user error reported, so that a launcher can pass it on to the other processes of a
# job (`distributed.exit_promptly_on_failure`) after `exit_on_user_error` turned it into an exit.
last_reported: str | None = None


@contextlib.contextmanager
def exit_on_user_error():
    global last_reported
    try:
        yield
    except UserError as e:
        last_reported = str(e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def check_local_dir(path, what: str) -> None:
    """A local directory the user named: one that is not there, or a file in it named instead
    (a common slip), says so."""
    if os.path.isfile(path):
        raise UserError(f"{path} is a file; the {what} path is the directory that holds it "
                        f"({os.path.dirname(os.path.abspath(path))}).")
    if not os.path.isdir(path):
        raise UserError(f"{what} directory {path} does not exist (jaxtune never downloads from a hub).")


def message_codes(message: str | None, size: int = MESSAGE_BYTES) -> np.ndarray:
    """`message` as `size` int64 byte codes (UTF-8, zero-padded; all zeros for None), so that
    a collective can send it from the one process that found a problem to all the others."""
    codes = np.zeros(size, np.int64)
    if message:
        text = message.encode()[:size]
        codes[:len(text)] = np.frombuffer(text, np.uint8)
    return codes


def message_from_codes(codes: np.ndarray) -> str | None:
    text = bytes(np.asarray(codes).astype(np.uint8)).rstrip(b"\0")
    return text.decode(errors="replace") if text else None
