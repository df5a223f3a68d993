"""The tokenized-data cache: a restart loads rows instead of tokenizing again.

An entry is keyed by everything that decides its rows: the data files (path, size,
modification time), the tokenizer's content (vocabulary, merges, special tokens, chat
template, turn-ending tokens), the settings that shape rows, the process slice and the
pipeline version. It is written to a temporary directory (files synced to disk) and renamed
into place, so a crash never leaves a half-written entry that a later run would trust; an
entry that cannot be read for any reason is rebuilt. Runs sharing a cache directory may
write the same entry at once: the first complete one stays, the others' copies are dropped.
Temporary directories that a killed run left are deleted by the next save, a day later.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid

import numpy as np

from jaxtune.data.rows import FIELDS, Rows

# Bump when a change to the pipeline changes the rows it makes from the same inputs.
# 2: templates that print the date get chat.TEMPLATE_DATE_STRING; 3: the report counts empty trained fields
PIPELINE_VERSION = 3


def tokenizer_fingerprint(tokenizer, eos_ids: frozenset[int]) -> str:
    h = hashlib.sha256()
    for part in (
        type(tokenizer).__name__,
        tokenizer.backend_tokenizer.to_str(),
        json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        json.dumps(sorted(eos_ids)),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_key(inputs: dict) -> str:
    """`inputs`: JSON-serialisable description of everything that decides the rows."""
    text = json.dumps({"pipeline_version": PIPELINE_VERSION, **inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def entry_dir(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, key)


def load(cache_dir: str, key: str) -> tuple[Rows, Rows | None, dict] | None:
    """(train, eval, report json) of a complete entry, or None (missing or unreadable: rebuild)."""
    path = entry_dir(cache_dir, key)
    if not os.path.isfile(os.path.join(path, "report.json")):
        return None
    try:
        with open(os.path.join(path, "report.json")) as f:
            report = json.load(f)
        train = _load_rows(os.path.join(path, "train.npz"))
        # the report says whether the entry has an eval split: a missing eval.npz is damage,
        # not "no eval" (the run would have skipped evaluation)
        eval_rows = _load_rows(os.path.join(path, "eval.npz")) if report.get("eval") is not None else None
    except Exception:  # noqa: BLE001 - truncated, zero-length, not a zip, wrong fields: rebuild
        return None
    return train, eval_rows, report


def save(cache_dir: str, key: str, inputs: dict, train: Rows, eval_rows: Rows | None, report: dict) -> str:
    """Writes an entry atomically (temp dir + rename); returns its directory."""
    os.makedirs(cache_dir, exist_ok=True)
    remove_leftovers(cache_dir)
    final = entry_dir(cache_dir, key)
    tmp = tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=cache_dir)
    try:
        _save_rows(os.path.join(tmp, "train.npz"), train)
        if eval_rows is not None:
            _save_rows(os.path.join(tmp, "eval.npz"), eval_rows)
        with open(os.path.join(tmp, "inputs.json"), "w") as f:  # for people: what this entry was made from
            json.dump({"pipeline_version": PIPELINE_VERSION, **inputs}, f, indent=1, sort_keys=True)
        with open(os.path.join(tmp, "report.json"), "w") as f:  # written last: marks the entry complete
            json.dump(report, f, indent=1)
            _sync(f)
        if not _move_into_place(tmp, final, cache_dir, key):
            shutil.rmtree(tmp)  # another run wrote the same entry first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_leftovers(cache_dir: str, max_age_s: float = 24 * 3600) -> None:
    """Deletes the temporary and set-aside directories of killed runs (a SIGKILL skips the
    cleanup in `save`); only old ones, as a run writing one now keeps touching it."""
    now = time.time()
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        leftover = (name.startswith(".") and name.endswith(".tmp")) or name.endswith(".trash")
        try:
            if leftover and os.path.isdir(path) and now - os.path.getmtime(path) > max_age_s:
                shutil.rmtree(path)
        except OSError:  # another run removed it first
            continue


def _move_into_place(tmp: str, final: str, cache_dir: str, key: str) -> bool:
    """Renames `tmp` to `final`; False when a readable entry is already there.

    An existing `final` is either a complete entry from a run with the same key (kept) or
    an unreadable one (moved to a unique name, then deleted, so that two runs replacing it
    at once never delete each other's files).
    """
    for _ in range(3):
        try:
            os.rename(tmp, final)  # fails when `final` exists and is not empty
            return True
        except OSError:
            if load(cache_dir, key) is not None:
                return False
            trash = f"{final}.{uuid.uuid4().hex}.trash"
            try:
                os.rename(final, trash)
            except OSError:  # another run moved or replaced it just now: look again
                continue
            shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, final)  # still contended: let the error say why
    return True


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _save_rows(path: str, rows: Rows) -> None:
    with open(path, "wb") as f:
        np.savez(f, **{name: getattr(rows, name) for name in FIELDS})
        _sync(f)


def _load_rows(path: str) -> Rows:
    with np.load(path, allow_pickle=False) as z:
        return Rows(*(z[name] for name in FIELDS))
