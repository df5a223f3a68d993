"""Data: formats -> tokenize (chat template, loss mask) -> pack -> loader.

`prepare_datasets(DataSettings.from_config(config), load_tokenizer(path))` gives this
process's train and eval `Rows` and a `DataReport`; `BatchLoader` feeds training batches
from a resumable `LoaderPosition`, `iter_eval_batches` the eval batches.
"""

from jaxtune.data.loader import BatchLoader, LoaderPosition, iter_eval_batches
from jaxtune.data.pipeline import PreparedData, prepare_datasets
from jaxtune.data.report import DataReport
from jaxtune.data.rows import Rows
from jaxtune.data.settings import DataSettings
from jaxtune.data.tokenize import load_tokenizer

__all__ = [
    "BatchLoader", "DataReport", "DataSettings", "LoaderPosition", "PreparedData", "Rows",
    "iter_eval_batches", "load_tokenizer", "prepare_datasets",
]
