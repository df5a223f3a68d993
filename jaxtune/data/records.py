"""Where a record came from, so every message about it can point at the file and line."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtune.errors import UserError


@dataclasses.dataclass(frozen=True)
class Location:
    """A record's place in its file: a 1-based line (JSONL, CSV), a 0-based item of a JSON
    array (as `data[i]` in Python or `.[i]` in jq), or a 0-based row (Parquet, Arrow)."""

    path: str
    line: int | None = None
    item: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.item is not None:
            return f"{self.path}[{self.item}]"
        if self.row is not None:
            return f"{self.path} row {self.row}"
        return self.path


@dataclasses.dataclass(frozen=True)
class Record:
    location: Location
    value: Any  # the parsed JSON value or table row (a dict when well formed)


class BadRecord(UserError):
    """One record is unusable; `data.on_bad_record="skip"` skips it, "error" stops with it."""

    def __init__(self, location: Location, reason: str, field: str | None = None):
        self.location = location
        self.reason = reason
        self.field = field  # the field path, e.g. "messages[2].role" (the reason names it too)
        super().__init__(f"{location}: {reason}")
