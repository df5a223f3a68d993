"""Files -> validated samples: the format of each file, and the bad-record policy."""

from __future__ import annotations

import dataclasses
from typing import Callable

from jaxtune.data.formats import REQUIRED_FIELDS, Sample, detect_format, parse_sample
from jaxtune.data.readers import SourceFile
from jaxtune.data.records import BadRecord, Record
from jaxtune.data.report import FileStats
from jaxtune.errors import UserError


@dataclasses.dataclass
class ReadResult:
    samples: list[Sample]
    files: list[FileStats]
    first_bad: str | None = None  # the first skipped record's message


def _expected() -> str:
    options = [f"{'+'.join(map(repr, fields))} ({fmt})" for fmt, fields in REQUIRED_FIELDS.items()]
    return ", ".join(options[:-1]) + " or " + options[-1]


def handle_bad(bad: BadRecord, on_bad_record: str, on_skip: Callable[[BadRecord], None]) -> None:
    """Stops with the record's message, or counts it and goes on."""
    if on_bad_record == "error":
        raise UserError(f"{bad}; set data.on_bad_record=skip to skip bad records.")
    on_skip(bad)


def read_samples(
    files: list[SourceFile], fmt: str, on_bad_record: str, split: str, on_skip: Callable[[BadRecord], None]
) -> ReadResult:
    """Every valid sample of `files`, in order. The format is `fmt`, or per file (with "auto")
    from a table's columns or the keys of the first JSON record."""
    result = ReadResult([], [])

    def skip(bad: BadRecord) -> None:
        result.first_bad = result.first_bad or str(bad)
        on_skip(bad)

    for source in files:
        stats = FileStats(source.path, split, fmt)
        columns = source.columns()
        if columns is not None:
            stats.format = _table_format(source, columns, fmt)
        for record in source.records():
            if not isinstance(record, BadRecord):
                if stats.format == "auto":
                    stats.format = _json_format(record)
                try:
                    sample = parse_sample(record.value, stats.format, record.location)
                except BadRecord as bad:
                    record = bad
                else:
                    result.samples.append(sample)
                    stats.records += 1
                    continue
            stats.bad_records += 1
            handle_bad(record, on_bad_record, skip)
        result.files.append(stats)
    return result


def _json_format(record: Record) -> str:
    """The format of a JSON file, from its first record's keys ("auto" while that is not an object)."""
    if not isinstance(record.value, dict):
        return "auto"  # parse_sample reports the record
    fmt = detect_format(record.value.keys())
    if fmt is None:
        keys = ", ".join(map(str, record.value.keys())) or "none"
        raise UserError(
            f"{record.location}: cannot tell the format of {record.location.path} from the keys of its first "
            f"record ({keys}){_near_names(record.value.keys())}{_nested_records(record.value)}; expected "
            f"{_expected()}: rename the fields, or set data.format."
        )
    return fmt


def _near_names(keys) -> str:
    """" ('completon' looks like 'completion')" for keys that are near a format's field name."""
    import difflib

    known = sorted({name for fields in REQUIRED_FIELDS.values() for name in fields} | {"input", "system"})
    near = [(k, m[0]) for k in map(str, keys) if k not in known
            for m in [difflib.get_close_matches(k, known, n=1, cutoff=0.75)] if m]
    return "".join(f" ({k!r} looks like {m!r})" for k, m in near)


def _nested_records(value: dict) -> str:
    """A hint for `{"data": [{...}, ...]}` on one line (json.dump's default), read as one record."""
    for key, item in value.items():
        if isinstance(item, list) and item and all(isinstance(x, dict) for x in item):
            return (f" (the records seem to be the list under {key!r}: put them in a top-level array, or write "
                    "them as JSON lines)")
    return ""


def _table_format(source: SourceFile, columns: tuple[str, ...], fmt: str) -> str:
    if fmt == "auto":
        detected = detect_format(columns)
        if detected is None:
            raise UserError(
                f"{source.path}: cannot tell the format from its columns ({', '.join(columns) or 'none'})"
                f"{_near_names(columns)}; expected {_expected()}: rename the columns, or set data.format."
            )
        return detected
    missing = [c for c in REQUIRED_FIELDS[fmt] if c not in columns]
    if missing:
        raise UserError(
            f"{source.path} has no column {missing[0]!r}, which format {fmt} needs "
            f"(its columns: {', '.join(columns) or 'none'})."
        )
    return fmt
