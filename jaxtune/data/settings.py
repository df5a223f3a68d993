"""The data settings, read once from the config, so the pipeline never looks at config keys."""

from __future__ import annotations

import dataclasses
import os

from jaxtune.errors import UserError

FORMATS = ("text", "prompt_completion", "alpaca", "sharegpt", "messages")
TRUNCATION = ("truncate", "drop")
ON_BAD_RECORD = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    train_files: tuple[str, ...]  # files, globs, or directories saved with datasets.save_to_disk
    eval_files: tuple[str, ...]
    format: str  # "auto" or one of FORMATS
    tokenizer_path: str
    max_seq_len: int
    model_path: str = ""  # the model directory: its generation_config.json names turn-ending tokens
    packing: bool = True
    truncation: str = "truncate"  # truncate | drop
    train_on_prompt: bool = False
    on_bad_record: str = "error"  # error | skip
    eval_fraction: float = 0.0  # held out of train (by seed, per record) when eval_files is empty
    cache_dir: str = ""  # "" disables the cache
    seed: int = 0

    def __post_init__(self):
        # Values can come from tools/check_data.py flags as well as a validated config.
        for name in ("train_files", "eval_files"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if self.format != "auto" and self.format not in FORMATS:
            raise UserError(f"unknown data format {self.format!r}; choose auto, {', '.join(FORMATS)}.")
        if self.truncation not in TRUNCATION:
            raise UserError(f"data.truncation must be truncate or drop, got {self.truncation!r}.")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise UserError(f"data.on_bad_record must be error or skip, got {self.on_bad_record!r}.")
        if self.max_seq_len < 2:
            raise UserError(f"data.max_seq_len must be at least 2, got {self.max_seq_len}.")
        if not 0 <= self.eval_fraction < 1:
            raise UserError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}.")

    @classmethod
    def from_config(cls, config) -> "DataSettings":
        d = config.data
        return cls(
            train_files=tuple(d.train_files),
            eval_files=tuple(d.eval_files),
            format=d.format,
            tokenizer_path=d.tokenizer_path or config.model.hf_path,
            max_seq_len=int(d.max_seq_len),
            model_path=config.model.hf_path,
            packing=bool(d.packing),
            truncation=d.truncation,
            train_on_prompt=bool(d.train_on_prompt),
            on_bad_record=d.on_bad_record,
            eval_fraction=float(d.eval_fraction),
            cache_dir=d.cache_dir or os.path.join(config.workdir, "data_cache"),
            seed=int(config.train.seed),
        )
