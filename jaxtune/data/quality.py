"""Data-quality checks behind tools/check_data.py: what is wrong with the data before a run.

It reads every record (collecting all invalid ones instead of stopping), tokenizes them as
training would, and counts: records per format, invalid records, exact and near duplicates,
token lengths and what truncation would do, trained tokens per sample, samples with none,
empty fields, and train/eval overlap (exact, and shared long word n-grams: contamination).
Errors make the tool exit non-zero; warnings do not.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from jaxtune.data import formats, pipeline
from jaxtune.data.formats import Sample, sample_fields, sample_format
from jaxtune.data.packing import pack
from jaxtune.data.readers import resolve_files
from jaxtune.data.records import BadRecord
from jaxtune.data.report import FileStats, SplitStats
from jaxtune.data.samples import read_samples
from jaxtune.data.settings import DataSettings
from jaxtune.data.tokenize import SampleEncoder, TokenizedSample, eos_token_ids
from jaxtune.errors import UserError

MAX_EXAMPLES = 10  # locations listed per finding
MAX_INVALID_LISTED = 1000


@dataclasses.dataclass
class Distribution:
    count: int = 0
    min: int = 0
    mean: float = 0.0
    p50: int = 0
    p90: int = 0
    p99: int = 0
    max: int = 0

    @classmethod
    def of(cls, values: Sequence[int]) -> "Distribution":
        if not len(values):
            return cls()
        v = np.asarray(values)
        p50, p90, p99 = (int(np.percentile(v, q, method="lower")) for q in (50, 90, 99))
        return cls(len(v), int(v.min()), round(float(v.mean()), 1), p50, p90, p99, int(v.max()))

    def __str__(self) -> str:
        return f"min {self.min:,}, median {self.p50:,}, p90 {self.p90:,}, p99 {self.p99:,}, max {self.max:,}"


@dataclasses.dataclass
class Finding:
    severity: str  # error | warning
    kind: str  # a stable name, e.g. "exact_duplicates"
    count: int
    message: str  # a sentence for people
    examples: list[str] = dataclasses.field(default_factory=list)  # locations, first MAX_EXAMPLES


@dataclasses.dataclass
class SplitQuality:
    files: list[FileStats]
    records: int  # valid records
    records_per_format: dict[str, int]
    invalid_records: int  # unreadable, malformed, or refused by the chat template
    invalid_examples: list[str]  # "FILE:LINE: reason", up to MAX_INVALID_LISTED
    samples: int  # tokenized
    token_lengths: Distribution  # tokens per sample, before truncation
    longer_than_max_seq_len: int
    truncation: SplitStats  # what data.truncation would do, as in training
    trained_tokens: Distribution  # per sample kept, after truncation
    exact_duplicates: int  # records equal to an earlier record
    near_duplicates: int  # more, equal only after normalisation
    empty_fields: dict[str, int]  # field -> records where it is empty or whitespace only
    packed_rows: int
    fill: float  # fraction of row tokens that are not padding


@dataclasses.dataclass
class Overlap:
    ngram: int
    exact: int  # eval samples whose normalised text is a train sample's
    ngram_matches: int  # further eval samples sharing a word n-gram with a train sample
    examples: list[str]


@dataclasses.dataclass
class QualityReport:
    tokenizer: str
    max_seq_len: int
    truncation: str
    train_on_prompt: bool
    packing: bool
    train: SplitQuality
    eval: SplitQuality | None
    overlap: Overlap | None
    findings: list[Finding]
    eval_source: str = "files"  # "files", "held out of train (...)" or "none"

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["num_errors"], d["num_warnings"] = len(self.errors), len(self.warnings)
        return d

    def summary(self) -> str:
        lines = [f"tokenizer {self.tokenizer}; max_seq_len {self.max_seq_len}, truncation {self.truncation}"
                 + (", train_on_prompt" if self.train_on_prompt else "")]
        for name, q in (("train", self.train), ("eval", self.eval)):
            if q is None:
                continue
            formats = ", ".join(f"{k}: {v:,}" for k, v in q.records_per_format.items()) or "none"
            t = q.truncation
            fate = (f"{t.truncated:,} would be truncated" if self.truncation == "truncate"
                    else f"{t.dropped_too_long:,} would be dropped")
            held_out = name == "eval" and self.eval_source.startswith("held out")
            lines += [
                "",
                (f"eval: {self.eval_source}, " if held_out else f"{name}: {len(q.files)} file(s), ")
                + f"{q.records:,} valid records ({formats}), "
                f"{q.invalid_records:,} invalid",
                f"  tokens per sample: {q.token_lengths}; {q.longer_than_max_seq_len:,} longer than "
                f"{self.max_seq_len} ({fate})",
                f"  trained tokens per sample: {q.trained_tokens}; {t.dropped_no_trained_tokens:,} sample(s) with none",
                f"  duplicates: {q.exact_duplicates:,} exact, {q.near_duplicates:,} near (normalised text)",
                "  empty fields: " + (", ".join(f"{k} {v:,}" for k, v in q.empty_fields.items()) or "none"),
                f"  rows: {q.packed_rows:,} of {self.max_seq_len} "
                f"({'packed' if self.packing else 'one sample per row'}, {100 * q.fill:.1f}% tokens)",
            ]
        if self.overlap is not None:
            o = self.overlap
            lines += ["", f"train/eval overlap: {o.exact:,} eval sample(s) also in train (normalised text), "
                          f"{o.ngram_matches:,} more share a {o.ngram}-word passage with train"]
        for title, items in (("errors", self.errors), ("warnings", self.warnings)):
            if items:
                lines += ["", f"{title} ({len(items)}):"]
                for f in items:
                    shown = "; ".join(f.examples[:3]) + (" ..." if len(f.examples) > 3 or f.count > 3 else "")
                    lines.append(f"  - {f.message}" + (f": {shown}" if shown else ""))
        lines += ["", f"result: {len(self.errors)} error(s), {len(self.warnings)} warning(s)"]
        return "\n".join(lines)


# ---- Text normalisation and n-grams ----------------------------------------------------------
_PUNCT = re.compile(r"[^\w\s]+")


def normalise(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: near duplicates compare equal."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def sample_text(sample: Sample) -> str:
    return "\n".join(f.text for f in sample_fields(sample))


def _canonical(sample: Sample) -> tuple:
    return tuple((f.name, f.text) for f in sample_fields(sample))


class _NgramHasher:
    """64-bit hashes of word n-grams (a random code per word, combined polynomially)."""

    def __init__(self, n: int):
        self.n = n
        self.codes: dict[str, int] = {}
        self.rng = np.random.default_rng(0)
        self.table = np.zeros(0, np.uint64)

    def __call__(self, words: list[str]) -> np.ndarray:
        if len(words) < self.n:
            return np.zeros(0, np.uint64)
        ids = np.fromiter((self.codes.setdefault(w, len(self.codes)) for w in words), np.int64, len(words))
        if len(self.codes) > len(self.table):
            grow = max(len(self.codes) - len(self.table), 4096)
            self.table = np.concatenate([self.table, self.rng.integers(0, 2**63, grow, dtype=np.uint64) * 2 + 1])
        codes = self.table[ids]
        m = len(words) - self.n + 1
        h = np.zeros(m, np.uint64)
        with np.errstate(over="ignore"):
            for k in range(self.n):
                h = h * np.uint64(1_000_003) + codes[k:k + m]
        return np.unique(h)


# ---- The checks --------------------------------------------------------------------------------
def check_data(settings: DataSettings, tokenizer, *, ngram: int = 13,
               vocab_size: int | None = None) -> tuple[QualityReport, list[tuple[TokenizedSample, str]]]:
    """The quality report, and the train samples as training will use them, each with a note
    ("" / "truncated from N tokens" / "dropped: why"; a dropped one as tokenized), for
    rendering with `render_sample`. With no eval files, `eval_fraction` is held out as in training.
    File-level problems (missing file, unknown format, no chat template) raise UserError.
    With the model's `vocab_size`, samples holding a token id it has no embedding for are errors."""
    eos_ids = eos_token_ids(tokenizer, settings.model_path, settings.tokenizer_path)
    encoder = SampleEncoder(tokenizer, train_on_prompt=settings.train_on_prompt, eos_ids=eos_ids)
    findings: list[Finding] = []
    if not settings.train_files:
        raise UserError("no training data: give --data FILE... (or --config with data.train_files).")
    train_read, train_invalid = _read_split("train", resolve_files(settings.train_files, "--data"), settings)
    train_part, eval_part, eval_source = train_read.samples, None, "none"
    eval_files = resolve_files(settings.eval_files, "--eval")
    if eval_files:
        eval_read, eval_invalid = _read_split("eval", eval_files, settings)
        eval_part, eval_source = eval_read.samples, "files"
    elif settings.eval_fraction > 0:  # as training does: these records are not trained on
        try:
            train_part, eval_part = pipeline.hold_out(train_read.samples, settings.eval_fraction, settings.seed)
            eval_read, eval_invalid, eval_source = train_read, [], f"held out of train (eval_fraction {settings.eval_fraction})"
        except UserError as e:  # too few valid records to hold any out: an error of the report, listed
            if train_read.samples:  # with none valid, the invalid records are the error, not the hold-out
                findings.append(Finding("error", "no_records_left_to_train", len(train_read.samples), str(e)))
    train, train_samples, train_tok = _check_split(
        "train", train_read.files, train_part, train_invalid, settings, encoder, findings, vocab_size)
    eval_q, overlap = None, None
    if eval_part is not None:
        eval_q, eval_samples, _ = _check_split(
            "eval", eval_read.files, eval_part, eval_invalid, settings, encoder, findings, vocab_size)
        overlap = _overlap(train_samples, eval_samples, ngram, findings)
    report = QualityReport(
        tokenizer=settings.tokenizer_path, max_seq_len=settings.max_seq_len, truncation=settings.truncation,
        train_on_prompt=settings.train_on_prompt, packing=settings.packing, train=train, eval=eval_q,
        overlap=overlap, findings=findings, eval_source=eval_source,
    )
    return report, train_tok


def _read_split(name, files, settings: DataSettings):
    invalid: list[str] = []
    read = read_samples(files, settings.format, "skip", name, lambda bad: invalid.append(str(bad)))
    return read, invalid


def _check_split(name, files, part: list[Sample], invalid: list[str], settings: DataSettings,
                 encoder: SampleEncoder, findings: list[Finding], vocab_size: int | None):
    """`part`: the split's samples (all of its files', or train's share after the eval hold-out)."""
    invalid = list(invalid)
    samples: list[Sample] = []
    tokenized: list[TokenizedSample] = []
    for start in range(0, len(part), pipeline.ENCODE_BATCH):
        chunk = part[start:start + pipeline.ENCODE_BATCH]
        for sample, result in zip(chunk, encoder.encode(chunk)):
            if isinstance(result, BadRecord):
                invalid.append(str(result))
            else:
                samples.append(sample)
                tokenized.append(result)

    stats = SplitStats(records=len(tokenized))
    kept, no_trained, shown = [], [], []
    for s in tokenized:
        before = stats.dropped_no_trained_tokens
        t = pipeline.truncate(s, settings, stats)
        if t is not None:
            kept.append(t)
            shown.append((t, f"truncated from {len(s.ids)} tokens" if len(t.ids) < len(s.ids) else ""))
        elif stats.dropped_no_trained_tokens > before:
            no_trained.append(str(s.location))
            cut = " after truncation" if len(s.ids) > settings.max_seq_len else ""
            shown.append((s, f"dropped: no trained token{cut}"))
        else:
            shown.append((s, f"dropped: longer than max_seq_len={settings.max_seq_len}"))
    rows = pack(kept, settings.max_seq_len, settings.packing)  # as training will lay them out
    stats.samples, stats.rows = len(kept), len(rows)
    stats.tokens, stats.trained_tokens = rows.num_tokens, rows.num_trained_tokens
    lengths = [len(s.ids) for s in tokenized]
    too_long = [str(s.location) for s in tokenized if len(s.ids) > settings.max_seq_len]
    beyond_vocab = [f"{s.location} (id {max(s.ids)})" for s in tokenized
                    if vocab_size is not None and len(s.ids) and max(s.ids) >= vocab_size]

    # Duplicates: exact (same fields), then near (same normalised text).
    first_exact: dict[tuple, str] = {}
    first_near: dict[str, str] = {}
    exact, near = [], []
    for s in samples:
        key = _canonical(s)
        where = str(s.location)
        if key in first_exact:
            exact.append(f"{where} = {first_exact[key]}")
            continue
        first_exact[key] = where
        norm = normalise(sample_text(s))
        if norm in first_near:
            near.append(f"{where} ~ {first_near[norm]}")
        else:
            first_near[norm] = where

    empty_trained, empty_prompt = [], []
    empty_fields: dict[str, int] = {}
    for s in samples:
        for label, trained in formats.empty_fields(s):
            empty_fields[label] = empty_fields.get(label, 0) + 1
            (empty_trained if trained else empty_prompt).append(f"{s.location} ({label})")

    per_format: dict[str, int] = {}
    for s in samples:
        per_format[sample_format(s)] = per_format.get(sample_format(s), 0) + 1

    def add(severity, kind, items, message):
        if items:
            findings.append(Finding(severity, kind, len(items), message.format(n=len(items), split=name),
                                    items[:MAX_EXAMPLES]))

    add("error", f"{name}_invalid_records", invalid, "{n:,} invalid record(s) in {split}")
    add("error", f"{name}_empty_completions", empty_trained,
        "{n:,} empty or whitespace-only trained field(s) in {split} (the model would learn to say nothing)")
    after = " after truncation" if settings.truncation == "truncate" else ""
    add("error", f"{name}_no_trained_tokens", no_trained, "{n:,} {split} sample(s) with no trained token" + after)
    add("error", f"{name}_token_ids_beyond_vocabulary", beyond_vocab,
        "{n:,} {split} sample(s) with a token id the model has no embedding for "
        + f"(vocab_size {vocab_size}; training refuses them)")
    add("warning", f"{name}_exact_duplicates", exact, "{n:,} exact duplicate(s) in {split}")
    add("warning", f"{name}_near_duplicates", near, "{n:,} near duplicate(s) in {split} (equal after normalising text)")
    add("warning", f"{name}_too_long", too_long,
        "{n:,} {split} sample(s) longer than " + f"max_seq_len={settings.max_seq_len} (would be "
        + ("truncated)" if settings.truncation == "truncate" else "dropped)"))
    add("warning", f"{name}_empty_prompt_fields", empty_prompt, "{n:,} empty prompt field(s) in {split}")
    if tokenized and not kept:  # training refuses such a split
        findings.append(Finding("error", f"{name}_all_dropped", len(tokenized),
                                pipeline.all_dropped_message(name, stats, settings, "")))

    quality = SplitQuality(
        files=files, records=len(part), records_per_format=per_format,
        invalid_records=len(invalid), invalid_examples=invalid[:MAX_INVALID_LISTED], samples=len(tokenized),
        token_lengths=Distribution.of(lengths), longer_than_max_seq_len=len(too_long), truncation=stats,
        trained_tokens=Distribution.of([s.num_trained for s in kept]), exact_duplicates=len(exact),
        near_duplicates=len(near), empty_fields=empty_fields, packed_rows=len(rows),
        fill=round(stats.tokens / (len(rows) * settings.max_seq_len), 4) if len(rows) else 0.0,
    )
    return quality, samples, shown


def _overlap(train: list[Sample], eval_samples: list[Sample], n: int, findings: list[Finding]) -> Overlap:
    """Eval samples found in train: exactly (normalised text) or by a shared n-word passage.
    Passages in more than 1% of train samples (and at least 3) are shared boilerplate, such as
    a common system prompt, and are ignored."""
    train_norm: dict[str, str] = {}
    hasher = _NgramHasher(n)
    hashes, owners = [], []
    for i, s in enumerate(train):
        norm = normalise(sample_text(s))
        train_norm.setdefault(norm, str(s.location))
        h = hasher(norm.split())
        hashes.append(h)
        owners.append(np.full(len(h), i, np.int64))
    all_h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    all_owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
    unique, first, counts = np.unique(all_h, return_index=True, return_counts=True)
    keep = counts <= max(3, 0.01 * len(train))
    unique, first = unique[keep], first[keep]

    exact, ngram = [], []
    for s in eval_samples:
        norm = normalise(sample_text(s))
        if norm in train_norm:
            exact.append(f"{s.location} = {train_norm[norm]}")
            continue
        h = hasher(norm.split())
        found = np.isin(h, unique)
        if found.any():
            j = np.searchsorted(unique, h[found][0])
            ngram.append(f"{s.location} ~ {train[all_owner[first[j]]].location}")
    if exact:
        message = f"{len(exact):,} eval sample(s) are also in train (normalised text)"
        findings.append(Finding("error", "eval_in_train", len(exact), message, exact[:MAX_EXAMPLES]))
    if ngram:
        findings.append(Finding("warning", "eval_ngram_overlap", len(ngram),
                                f"{len(ngram):,} eval sample(s) share a {n}-word passage with train (possible "
                                "contamination)", ngram[:MAX_EXAMPLES]))
    return Overlap(n, len(exact), len(ngram), (exact + ngram)[:MAX_EXAMPLES])


# ---- Rendering a sample with its mask --------------------------------------------------------
def render_sample(tokenizer, sample: TokenizedSample, color: bool = False) -> str:
    """The sample's text with trained tokens marked: [[...]] or, on a terminal, green."""
    out = []
    mask = sample.mask.tolist()
    if not mask:  # a template that renders a record as nothing
        return ""
    mask[0] = False  # the first token is never a target
    start = 0
    for t in range(1, len(mask) + 1):
        if t == len(mask) or mask[t] != mask[start]:
            text = tokenizer.decode(sample.ids[start:t].tolist(), skip_special_tokens=False)
            if mask[start]:
                text = f"\x1b[42m{text}\x1b[0m" if color else f"[[{text}]]"
            out.append(text)
            start = t
    return "".join(out)
