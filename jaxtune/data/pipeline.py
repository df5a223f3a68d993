"""prepare_datasets: files -> validated samples -> token ids and masks -> rows, cached.

Every process parses and validates every record (cheap), so a bad record stops all hosts
with the same message and the eval hold-out is the same everywhere; each process then
renders, tokenizes and packs only its own slice (the expensive part): record i of a split
belongs to process i % process_count. What only a slice shows (a conversation the chat
template cannot render, a split with nothing left) is decided together, in one collective.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from jaxtune.data import cache
from jaxtune.data.formats import Sample
from jaxtune.data.packing import pack
from jaxtune.data.readers import refuse_shared_files, resolve_files
from jaxtune.data.records import BadRecord
from jaxtune.data.report import MAX_EXAMPLES, DataReport, SplitStats
from jaxtune.data.rows import Rows
from jaxtune.data.samples import ReadResult, handle_bad, read_samples
from jaxtune.data.settings import DataSettings
from jaxtune.data.tokenize import SampleEncoder, TokenizedSample, eos_token_ids
from jaxtune.errors import UserError, message_codes, message_from_codes

ENCODE_BATCH = 1024  # samples per batched template render and tokenizer call
_HOLDOUT_STREAM = 0x5EED_E7A1  # keeps the hold-out draw apart from the loader's shuffles


@dataclasses.dataclass
class PreparedData:
    train: Rows
    eval: Rows | None
    report: DataReport


def prepare_datasets(
    settings: DataSettings,
    tokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    log: Callable[[str], None] = print,
    gather: Callable[[np.ndarray], np.ndarray] | None = None,
) -> PreparedData:
    """Reads, validates, tokenizes, masks, truncates and packs this process's slice of the data.

    The result is cached under `settings.cache_dir`. `gather` stacks an array from every
    process (`distributed.gather`); with it, whether a split was all dropped is decided on
    every process's counts, so all processes stop with the same error together (one
    stopping alone left the others waiting in their next collective). Without it, this
    process's slice is judged alone.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if not settings.train_files:
        raise UserError("data.train_files must list at least one file, glob or directory.")
    train_files = resolve_files(settings.train_files, "data.train_files")
    eval_files = resolve_files(settings.eval_files, "data.eval_files")
    refuse_shared_files(train_files, eval_files)
    eos_ids = eos_token_ids(tokenizer, settings.model_path, settings.tokenizer_path)

    key_inputs = {
        "train_files": [f.identity() for f in train_files],
        "eval_files": [f.identity() for f in eval_files],
        "tokenizer": cache.tokenizer_fingerprint(tokenizer, eos_ids),
        # Directories enter by what they hold (the fingerprint above), not by name.
        "settings": {
            k: v for k, v in dataclasses.asdict(settings).items()
            if k not in ("train_files", "eval_files", "tokenizer_path", "model_path", "cache_dir")
        },
        "process": [process_index, process_count],
    }
    key = cache.cache_key(key_inputs)
    if settings.cache_dir:
        hit = cache.load(settings.cache_dir, key)
        if hit is not None:
            train, eval_rows, report_json = hit
            report = DataReport.from_json(report_json)
            report.cache_hit = True
            log(f"data: cache hit, loaded {len(train):,} train rows from {cache.entry_dir(settings.cache_dir, key)}")
            check_not_all_dropped(report, settings, gather)
            return PreparedData(train, eval_rows, report)
        log(f"data: cache miss, reading and tokenizing (cache: {settings.cache_dir})")

    eval_source = "files" if eval_files else ("held out" if settings.eval_fraction > 0 else "none")
    report = DataReport(settings.max_seq_len, settings.packing, process_index, process_count, eval_source)
    on_skip = lambda bad: report.add_bad(str(bad))  # noqa: E731
    train = read_samples(train_files, settings.format, settings.on_bad_record, "train", on_skip)
    report.files.extend(train.files)
    _check_not_empty(train, "data.train_files")
    train_samples, eval_samples = train.samples, None
    if eval_files:
        ev = read_samples(eval_files, settings.format, settings.on_bad_record, "eval", on_skip)
        report.files.extend(ev.files)
        _check_not_empty(ev, "data.eval_files")
        eval_samples = ev.samples
    elif settings.eval_fraction > 0:
        train_samples, eval_samples = hold_out(train.samples, settings.eval_fraction, settings.seed)

    report.add_empty_trained(train.samples)
    if eval_files:
        report.add_empty_trained(eval_samples)
    encoder = SampleEncoder(tokenizer, train_on_prompt=settings.train_on_prompt, eos_ids=eos_ids)
    share = slice(process_index, None, process_count)
    skipped_here: list[str] = []  # the chat template could not render them; only this process saw them

    def on_skip_here(bad: BadRecord) -> None:
        skipped_here.append(str(bad))
        on_skip(bad)

    train_rows, first_bad = _build(train_samples[share], encoder, settings, report.train, on_skip_here)
    eval_rows = None
    if eval_samples is not None and first_bad is None:
        report.eval = SplitStats()
        eval_rows, eval_bad = _build(eval_samples[share], encoder, settings, report.eval, on_skip_here)
        if eval_bad is not None:
            first_bad = _FirstBad(1, eval_bad.index, eval_bad.message)
    if first_bad is not None:  # its index in this process's share -> in the split
        first_bad = dataclasses.replace(first_bad, index=first_bad.index * process_count + process_index)
    check_not_all_dropped(report, settings, gather, first_bad, skipped_here[0] if skipped_here else None)

    if settings.cache_dir:
        try:
            path = cache.save(settings.cache_dir, key, key_inputs, train_rows, eval_rows, report.to_json())
            log(f"data: cached in {path}")
        except OSError as e:  # a read-only or full cache (e.g. a shared one) costs the next run time, not this one
            log(f"warning: could not write the data cache in {settings.cache_dir} ({e.strerror or e}); "
                "continuing without it")
    return PreparedData(train_rows, eval_rows, report)


def hold_out(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, eval): round(fraction x N) records (at least one) drawn by `seed`; order kept."""
    n = len(samples)
    n_eval = max(1, int(round(fraction * n)))
    if n_eval >= n:
        raise UserError(
            f"data.eval_fraction={fraction} of {n} record(s) leaves no training records; "
            "add data or set data.eval_files."
        )
    rng = np.random.default_rng([_HOLDOUT_STREAM, seed % 2**63])
    is_eval = np.zeros(n, bool)
    is_eval[rng.permutation(n)[:n_eval]] = True
    return [s for s, e in zip(samples, is_eval) if not e], [s for s, e in zip(samples, is_eval) if e]


def truncate(sample: TokenizedSample, settings: DataSettings, stats: SplitStats) -> TokenizedSample | None:
    """Applies data.truncation and drops samples without a trained token; counts both."""
    if len(sample.ids) > settings.max_seq_len:
        if settings.truncation == "drop":
            stats.dropped_too_long += 1
            return None
        stats.truncated += 1
        n = settings.max_seq_len
        sample = TokenizedSample(sample.location, sample.ids[:n], sample.mask[:n])
    if sample.num_trained == 0:
        stats.dropped_no_trained_tokens += 1
        return None
    return sample


@dataclasses.dataclass(frozen=True)
class _FirstBad:
    """A record the chat template could not render, with data.on_bad_record=error: only the
    process whose share holds it finds it, so the processes agree on the first one
    (`check_not_all_dropped`) and all stop with its message."""

    split: int  # 0 train, 1 eval: train is read first, as one process would
    index: int  # in the split's records (in this process's share until `prepare_datasets` maps it)
    message: str


def _build(
    samples: Sequence[Sample], encoder: SampleEncoder, settings: DataSettings, stats: SplitStats, on_skip
) -> tuple[Rows, _FirstBad | None]:
    """This share's rows; with on_bad_record=error, stops at its first bad record and returns it
    instead of raising (see `_FirstBad`)."""
    stats.records = len(samples)
    kept: list[TokenizedSample] = []
    for start in range(0, len(samples), ENCODE_BATCH):
        for offset, result in enumerate(encoder.encode(samples[start:start + ENCODE_BATCH])):
            if isinstance(result, BadRecord):
                stats.bad_records += 1
                try:
                    handle_bad(result, settings.on_bad_record, on_skip)
                except UserError as e:  # on_bad_record=error
                    return Rows.padding(0, settings.max_seq_len), _FirstBad(0, start + offset, str(e))
                continue
            sample = truncate(result, settings, stats)
            if sample is not None:
                kept.append(sample)
    rows = pack(kept, settings.max_seq_len, settings.packing)
    stats.samples = len(kept)
    stats.rows = len(rows)
    stats.tokens = rows.num_tokens
    stats.trained_tokens = rows.num_trained_tokens
    return rows, None


def _check_not_empty(read: ReadResult, key: str) -> None:
    if not read.samples:
        bad = sum(f.bad_records for f in read.files)
        raise UserError(f"{key} has no valid records: all {bad:,} record(s) are bad, the first: {read.first_bad}.")


_COUNTED = ("records", "samples", "dropped_too_long", "dropped_no_trained_tokens", "bad_records")


_FATAL, _SKIPPED = 1, 2  # what a process's message in `check_not_all_dropped` is


def check_not_all_dropped(report: DataReport, settings: DataSettings, gather=None,
                          first_bad: _FirstBad | None = None, skipped_example: str | None = None) -> None:
    """Every process needs training samples (it feeds its own devices' rows); an eval set needs
    a sample on some process (`evaluate` gives a process without any padding-only batches).
    A bad record found by any process (`_FirstBad`) stops them all, first; records skipped in
    other processes' shares are counted in `report` (with an example), since only process 0
    prints. One collective, which every process makes whether its data came from the cache or not."""
    splits = (report.train, report.eval or SplitStats())
    counts = np.array([[getattr(stats, f) for f in _COUNTED] for stats in splits], np.int64)  # [split, field]
    if first_bad:
        about, message = [_FATAL, first_bad.split, first_bad.index], first_bad.message
    else:
        about, message = [_SKIPPED if skipped_example else 0, 0, 0], skipped_example
    mine = np.concatenate([counts.ravel(), about, message_codes(message)])
    gathered = np.asarray(gather(mine) if gather else mine[None]).reshape(-1, mine.size)
    me = report.process_index if gather else 0  # without `gather`, this process's row alone
    fatal = [(row[counts.size + 1], row[counts.size + 2], k) for k, row in enumerate(gathered)
             if row[counts.size] == _FATAL]
    if fatal:
        k = min(fatal)[2]  # the first in data order; this process's own message is not cut to fit
        raise UserError(first_bad.message if k == me else message_from_codes(gathered[k, counts.size + 3:]))
    every = gathered[:, :counts.size].reshape(-1, len(splits), len(_COUNTED))
    skipped = every[:, :, _COUNTED.index("bad_records")].sum(axis=1)  # per process
    report.bad_records_elsewhere = int(skipped.sum() - skipped[me])
    for k, row in enumerate(gathered):
        example = message_from_codes(row[counts.size + 3:]) if row[counts.size] == _SKIPPED else None
        if (k != me and example and example not in report.bad_record_examples
                and len(report.bad_record_examples) < MAX_EXAMPLES):
            report.bad_record_examples.append(example)
    empty = np.flatnonzero(every[:, 0, 1] == 0)
    if empty.size:
        proc = int(empty[0])
        where = f"in process {proc}'s slice of {len(every)}" if len(every) > 1 else ""
        raise UserError(all_dropped_message("train", SplitStats(**dict(zip(_COUNTED, every[proc, 0].tolist()))),
                                     settings, where))
    total_eval = every[:, 1].sum(axis=0)
    if report.eval is not None and total_eval[0] and total_eval[1] == 0:
        raise UserError(all_dropped_message("eval", SplitStats(**dict(zip(_COUNTED, total_eval.tolist()))),
                                            settings, ""))


def all_dropped_message(split: str, stats: SplitStats, settings: DataSettings, where: str) -> str:
    reasons = []
    if stats.dropped_too_long:
        reasons.append(f"{stats.dropped_too_long:,} longer than data.max_seq_len={settings.max_seq_len}")
    if stats.dropped_no_trained_tokens:
        reasons.append(f"{stats.dropped_no_trained_tokens:,} with no trained token left")
    if stats.bad_records:
        reasons.append(f"{stats.bad_records:,} the chat template could not render")
    if not stats.records:
        return f"no {split} records {where}: there are fewer records than processes.".replace("  ", " ")
    remedies = []  # only those that would help: truncation=truncate keeps a too-long sample, not an empty one
    if stats.dropped_too_long or stats.dropped_no_trained_tokens:
        remedies.append("raise data.max_seq_len")
    if stats.dropped_too_long:
        remedies.append("use data.truncation=truncate")
    remedies.append("fix the data")
    return (
        f"all {stats.records:,} {split} sample(s) {where} were dropped ({', '.join(reasons)}); "
        f"{', '.join(remedies[:-1])}{', or ' if len(remedies) > 1 else ''}{remedies[-1]}."
    ).replace("  ", " ")
