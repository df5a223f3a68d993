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


class UserError(Exception):
    """An error the user can fix; its message is the whole report."""

    exit_code = 2


@contextlib.contextmanager
def exit_on_user_error():
    try:
        yield
    except UserError as e:
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
