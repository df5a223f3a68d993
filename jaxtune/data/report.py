"""What the pipeline did to the data, in counts: for the run log and tools/check_data.py."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtune.data.formats import empty_fields

MAX_EXAMPLES = 5  # bad-record locations kept in the report


@dataclasses.dataclass
class FileStats:
    path: str
    split: str  # train | eval
    format: str
    records: int = 0  # valid records
    bad_records: int = 0  # skipped (on_bad_record="skip")


@dataclasses.dataclass
class SplitStats:
    """One split, for this process's slice of its records."""

    records: int = 0  # valid records in this process's slice
    bad_records: int = 0  # records the chat template could not render (skipped)
    samples: int = 0  # kept after truncation and drops
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_trained_tokens: int = 0
    rows: int = 0
    tokens: int = 0  # not padding
    trained_tokens: int = 0

    def fill(self, seq_len: int) -> float:
        return self.tokens / (self.rows * seq_len) if self.rows else 0.0


@dataclasses.dataclass
class DataReport:
    max_seq_len: int
    packing: bool
    process_index: int
    process_count: int
    eval_source: str  # "files", "held out" (eval_fraction of the train records) or "none"
    files: list[FileStats] = dataclasses.field(default_factory=list)
    bad_records: int = 0  # records skipped: invalid ones in every file, and those of this process's share
    # conversations the chat template could not render in the other processes' shares (skipped)
    bad_records_elsewhere: int = 0
    bad_record_examples: list[str] = dataclasses.field(default_factory=list)  # "FILE:LINE: reason"
    # trained fields (a completion, an assistant message) that are empty: they train only the EOS
    empty_trained: int = 0
    empty_trained_examples: list[str] = dataclasses.field(default_factory=list)  # "FILE:LINE (field)"
    train: SplitStats = dataclasses.field(default_factory=SplitStats)
    eval: SplitStats | None = None
    cache_hit: bool = False

    def records_per_format(self, split: str = "train") -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            if f.split == split:
                out[f.format] = out.get(f.format, 0) + f.records
        return out

    def add_bad(self, message: str) -> None:
        self.bad_records += 1
        if len(self.bad_record_examples) < MAX_EXAMPLES:
            self.bad_record_examples.append(message)

    def add_empty_trained(self, samples) -> None:
        for sample in samples:
            for label, trained in empty_fields(sample):
                if trained:
                    self.empty_trained += 1
                    if len(self.empty_trained_examples) < MAX_EXAMPLES:
                        self.empty_trained_examples.append(f"{sample.location} ({label})")

    def summary(self) -> str:
        lines = []
        for split in ("train", "eval"):
            files = [f for f in self.files if f.split == split]
            if files:
                formats = ", ".join(f"{k}: {v:,}" for k, v in self.records_per_format(split).items())
                records = sum(f.records for f in files)
                # named: a recipe's eval files stay in use when the command line replaces only its train files
                names = ", ".join(f.path for f in files[:3]) + (f", ... ({len(files)} files)" if len(files) > 3 else "")
                lines.append(f"{split} data: {names}: {records:,} records ({formats})")
        skipped = self.bad_records + self.bad_records_elsewhere
        if skipped:
            elsewhere = ""
            if self.bad_records_elsewhere:
                elsewhere = f" ({self.bad_records_elsewhere:,} in other processes' shares)"
            examples = f", e.g. {'; '.join(self.bad_record_examples[:3])}" if self.bad_record_examples else ""
            lines.append(f"skipped {skipped:,} bad record(s){elsewhere}{examples}")
        if self.empty_trained:
            lines.append(f"warning: {self.empty_trained:,} empty or whitespace-only trained field(s), which teach the "
                         "model to say nothing, e.g. " + "; ".join(self.empty_trained_examples[:3])
                         + " (tools/check_data.py lists them)")
        who = f" (process {self.process_index} of {self.process_count})" if self.process_count > 1 else ""
        for name, s in (("train", self.train), ("eval", self.eval)):
            if s is None:
                continue
            source = {"files": " (eval files)", "held out": " (held out of train)"}.get(self.eval_source, "")
            source = source if name == "eval" else ""
            dropped = []
            if s.truncated:
                dropped.append(f"{s.truncated:,} truncated")
            if s.dropped_too_long:
                dropped.append(f"{s.dropped_too_long:,} dropped as longer than {self.max_seq_len}")
            if s.dropped_no_trained_tokens:
                dropped.append(f"{s.dropped_no_trained_tokens:,} dropped with no trained token")
            if s.bad_records:
                dropped.append(f"{s.bad_records:,} the chat template could not render")
            extra = f" ({', '.join(dropped)})" if dropped else ""
            lines.append(
                f"{name}{who}{source}: {s.records:,} records -> {s.samples:,} samples{extra} -> {s.rows:,} rows of "
                f"{self.max_seq_len} ({'packed' if self.packing else 'one sample per row'}, "
                f"{100 * s.fill(self.max_seq_len):.1f}% tokens), {s.trained_tokens:,} trained tokens"
            )
        if self.cache_hit:
            lines.append("(loaded from the data cache)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["records_per_format"] = {"train": self.records_per_format("train"), "eval": self.records_per_format("eval")}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DataReport":
        d = dict(d)
        d.pop("records_per_format", None)
        d["files"] = [FileStats(**f) for f in d["files"]]
        d["train"] = SplitStats(**d["train"])
        d["eval"] = SplitStats(**d["eval"]) if d["eval"] is not None else None
        return cls(**d)
