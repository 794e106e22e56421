"""Data: corpora (embedded stdlib default, any datasets.load_dataset call), tokenizers, packing, DataModule.

The configuration (`distill.data.config`) loads with the standard library alone; the rest (datasets,
tokenizers, Lightning) is imported on first use, so an app can check its whole configuration and report
a bad value before those libraries load.
"""

from importlib import import_module
from typing import Any

from distill.data.config import DataConfig, TokenizerConfig

_LAZY = {
    "build_corpus": "corpus", "corpus_fingerprint": "corpus",
    "LMDataModule": "datamodule", "format_stats": "datamodule",
    "iter_blocks": "packing", "pack_corpus": "packing", "tokenize_corpus": "packing",
    "TextTokenizer": "tokenizer", "build_tokenizer": "tokenizer",
}

__all__ = ["DataConfig", "TokenizerConfig", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"distill.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
