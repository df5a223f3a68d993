"""Finding data files and reading their records, each with its location.

JSON and JSONL are parsed here, line by line, so that a malformed line is reported as
`FILE:LINE` and can be skipped; CSV goes through the `csv` module (every value a string, and
the line where each row starts), Parquet through pyarrow and `save_to_disk` directories
through `datasets`. None of them writes anything (no Arrow cache files).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import sys
from typing import Iterator

from jaxtune.data.records import BadRecord, Location, Record
from jaxtune.errors import UserError

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: str
    kind: str  # jsonl | json | csv | parquet | arrow (a datasets.save_to_disk directory)

    def columns(self) -> tuple[str, ...] | None:
        """Column names of a table (CSV, Parquet, Arrow); None for JSON, whose records vary."""
        if self.kind == "csv":
            with _open_text(self.path) as f:
                try:
                    header = _csv_header(csv.reader(f, strict=True))
                except (csv.Error, UnicodeDecodeError) as e:
                    raise UserError(f"{self.path}: cannot read the CSV header ({e}).") from None
            return tuple(header or ())
        if self.kind == "parquet":
            return tuple(_parquet_file(self.path).schema_arrow.names)
        if self.kind == "arrow":
            return tuple(_load_arrow_dir(self.path).column_names)
        return None

    def records(self) -> Iterator[Record | BadRecord]:
        """Every record in file order; a record that cannot be parsed comes as a BadRecord.
        Raises UserError for what cannot be skipped (an unreadable or empty file)."""
        reader = {
            "jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv,
            "parquet": _read_parquet, "arrow": _read_arrow,
        }[self.kind]
        count = 0
        for record in reader(self.path):
            count += 1
            yield record
        if count == 0:
            raise UserError(f"{self.path} is empty: it has no records.")

    def identity(self) -> list:
        """Path, size and modification time of every file it reads: a change means re-reading."""
        paths = [self.path]
        if self.kind == "arrow":
            paths = sorted(
                os.path.join(root, name) for root, _, names in os.walk(self.path) for name in names
            )
        out = []
        for p in paths:
            st = os.stat(p)
            out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
        return out


def same_file_key(path: str) -> tuple[int, int]:
    """What two names of one file share, whatever the spelling: a symlink's target or a hard
    link (`cp -al`, `rsync --link-dest`), which a real path does not reveal."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def refuse_shared_files(train: list[SourceFile], evaluation: list[SourceFile]) -> None:
    """An eval file that a train glob also matches would be trained on and then evaluated."""
    train_files = {same_file_key(f.path) for f in train}
    shared = [f.path for f in evaluation if same_file_key(f.path) in train_files]
    if shared:
        raise UserError(
            f"{shared[0]} is in both data.train_files and data.eval_files, so its records would be trained "
            "on and then evaluated; narrow the train files (a glob may match it)."
        )


def resolve_files(specs: tuple[str, ...], key: str) -> list[SourceFile]:
    """Expands files, globs and `save_to_disk` directories (in the order given, globs sorted).
    A file named twice, in any spelling (`a.jsonl`, `./a.jsonl`, a symbolic or hard link), is
    read once."""
    files: list[SourceFile] = []
    seen: set[tuple[int, int]] = set()  # same_file_key; messages keep the path as given
    for spec in specs:
        if glob.has_magic(spec):
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            if not matches:
                raise UserError(f"{key}: the glob {spec!r} matches no files.")
        else:
            matches = [os.path.expanduser(spec)]
            if not os.path.exists(matches[0]):
                raise UserError(f"{key}: {spec} does not exist.")
        for path in matches:
            identity = same_file_key(path)
            if identity not in seen:
                seen.add(identity)
                files.append(_source(path, key))
    return files


def _source(path: str, key: str) -> SourceFile:
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            splits = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
            raise UserError(
                f"{key}: {path} holds several splits ({', '.join(splits)}); name one of them, "
                f"e.g. {os.path.join(path, splits[0] if splits else 'train')}."
            )
        if os.path.isfile(os.path.join(path, "state.json")):
            return SourceFile(path, "arrow")
        raise UserError(
            f"{key}: {path} is a directory but not a dataset saved with datasets.save_to_disk; "
            f"name its files or a glob such as {os.path.join(path, '*.jsonl')}."
        )
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_KINDS:
        raise UserError(
            f"{key}: cannot read {path}: unsupported file type {ext or '(no extension)'!r} "
            f"(supported: {', '.join(FILE_KINDS)}, or a datasets.save_to_disk directory)."
        )
    return SourceFile(path, FILE_KINDS[ext])


def _open_text(path: str):
    # utf-8-sig drops the byte order mark Excel's "CSV UTF-8" writes, which would join the first column's name.
    return open(path, encoding="utf-8-sig", newline="")


_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff")  # UTF-32 LE starts like UTF-16 LE


def _refuse_utf16_32(path: str, head: bytes) -> None:
    """json.loads guesses UTF-16/32 from bytes, which half-reads such a file line by line."""
    if head.startswith(_UTF16_32_BOMS) or head.startswith(b"\x00\x00\xfe\xff"):
        raise UserError(f"{path} is UTF-16 or UTF-32 text; save it as UTF-8.")


def _read_jsonl(path: str) -> Iterator[Record | BadRecord]:
    with open(path, "rb") as f:
        _refuse_utf16_32(path, f.read(4))
        f.seek(0)
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            location = Location(path, line=number)
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                yield Record(location, json.loads(text))
            except UnicodeDecodeError:
                yield BadRecord(location, "the line is not valid UTF-8 text")
            except json.JSONDecodeError as e:
                yield BadRecord(location, f"malformed JSON ({e.msg} at column {e.colno})")


def _read_json(path: str) -> Iterator[Record | BadRecord]:
    """A JSON array of records; a `.json` file that is not an array is read as JSON lines."""
    with open(path, "rb") as f:
        head = f.read(4096)
    _refuse_utf16_32(path, head)
    head = head.lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if not head.startswith(b"["):
        _refuse_one_object(path)
        yield from _read_jsonl(path)
        return
    try:
        with open(path, encoding="utf-8-sig") as f:
            items = json.load(f)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not valid UTF-8 text.") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}).") from None
    for index, value in enumerate(items):
        yield Record(Location(path, item=index), value)


_ONE_OBJECT_READ_LIMIT = 64 * 2**20


def _refuse_one_object(path: str) -> None:
    """A `.json` file that is one object spread over lines (`{"data": [...]}`) read as JSON
    lines gave an error per line, and with data.on_bad_record=skip "all records are bad".
    Checked only when its first line is not JSON on its own, so JSON lines cost nothing."""
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        json.loads(first.decode("utf-8-sig"))
        return  # JSON lines (a one-line object is a record; its format is judged with the others)
    except ValueError:
        pass
    if first.strip() not in (b"{", b"\xef\xbb\xbf{") and os.path.getsize(path) > _ONE_OBJECT_READ_LIMIT:
        return  # a large file whose first line is a bad record: not read whole (the lines are reported)
    try:
        with open(path, encoding="utf-8-sig") as f:
            value = json.load(f)
    except ValueError:
        return  # not one JSON value either: the JSON-lines reader names the bad lines
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        hint = f" (e.g. the list under {lists[0]!r})" if lists else ""
        keys = ", ".join(map(str, list(value)[:5])) or "none"
        raise UserError(f"{path} holds one JSON object (keys: {keys}), not an array of records or one record per "
                        f"line; put the records in a top-level array{hint}, or write them as JSON lines.")


def _read_csv(path: str) -> Iterator[Record | BadRecord]:
    """Rows as dicts, each at the line where it starts. csv.reader, not DictReader: DictReader
    skips blank lines without saying so, which hides where the row it returns starts."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts exceed the 128 KiB default
    start = 1
    try:
        with _open_text(path) as f:
            # strict: a quote left open would otherwise swallow the rows after it into one field
            reader = csv.reader(f, strict=True)
            header = _csv_header(reader)
            if header is None:
                return
            twice = sorted({name for name in header if header.count(name) > 1})
            if twice:
                raise UserError(f"{path}:{reader.line_num}: the header names column(s) {', '.join(twice)} more than once.")
            start = reader.line_num + 1
            for row in reader:  # one row, or [] for one blank line
                location = Location(path, line=start)
                start = reader.line_num + 1
                if not row:
                    continue
                if len(row) != len(header):
                    reason = f"the row has {len(row)} value(s) but the header has {len(header)} columns"
                    yield BadRecord(location, reason)
                else:
                    yield Record(location, dict(zip(header, row)))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not valid UTF-8 text.") from None
    except csv.Error as e:  # named where its row starts: an open quote may have run on for lines
        if "unexpected end of data" in str(e):  # the file ended inside a quoted field
            raise UserError(f"{path}:{start}: malformed CSV (a quoted field in the row that starts here is never "
                            "closed).") from None
        detected = f"; found at line {reader.line_num}" if reader.line_num != start else ""
        raise UserError(f"{path}:{start}: malformed CSV in the row that starts here ({e}{detected}).") from None


def _csv_header(reader) -> list[str] | None:
    """The first row that is not blank (blank lines are ignored everywhere, also before it)."""
    return next((row for row in reader if row), None)


def _parquet_file(path: str):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"{path}: cannot read Parquet file ({e}).") from None


def _read_parquet(path: str) -> Iterator[Record | BadRecord]:
    row = 0
    for batch in _parquet_file(path).iter_batches(batch_size=_BATCH):
        for value in batch.to_pylist():
            yield Record(Location(path, row=row), value)
            row += 1


def _load_arrow_dir(path: str):
    import datasets

    try:
        return datasets.load_from_disk(path)
    except Exception as e:  # datasets raises several types for a damaged directory
        raise UserError(f"{path}: cannot load the datasets.save_to_disk directory ({e}).") from None


def _read_arrow(path: str) -> Iterator[Record | BadRecord]:
    table = _load_arrow_dir(path).data  # an Arrow table; save_to_disk already applied any index mapping
    row = 0
    for batch in table.to_batches(max_chunksize=_BATCH):
        for value in batch.to_pylist():
            yield Record(Location(path, row=row), value)
            row += 1
