"""Data: corpora (embedded stdlib default, any datasets.load_dataset call), tokenizers, packing, DataModule."""

from distill.data.config import (
    DataConfig,
    TokenizerConfig,
)
from distill.data.corpus import build_corpus, corpus_fingerprint
from distill.data.datamodule import LMDataModule, format_stats
from distill.data.packing import iter_blocks, pack_corpus, tokenize_corpus
from distill.data.tokenizer import TextTokenizer, build_tokenizer

__all__ = [
    "DataConfig",
    "LMDataModule",
    "TextTokenizer",
    "TokenizerConfig",
    "build_corpus",
    "build_tokenizer",
    "corpus_fingerprint",
    "format_stats",
    "iter_blocks",
    "pack_corpus",
    "tokenize_corpus",
]
