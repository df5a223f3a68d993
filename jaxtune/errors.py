"""User-facing errors: one clear sentence, a non-zero exit, no traceback.

Library code raises `UserError` for anything the user can fix (a bad config key, a
missing file, a malformed record). Front ends (`run.py`, `tools/`) catch it with
`exit_on_user_error` and print only the message. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
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
