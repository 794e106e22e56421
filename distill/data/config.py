"""Data configuration (the `data` config node) with its checks, and where the data caches live."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import ConfigError

DEFAULT_CACHE_DIR = "~/.cache/distill"
EOS_TOKEN = "<|endoftext|>"  # the end-of-text token of the tokenizers we build (bpe, bytes)
SPLITS = ("train", "validation", "test")
# Bump when a change in this package changes what a cached artifact contains.
PIPELINE_VERSION = 1


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # "bpe" | "bytes" | "pretrained"
    vocab_size: int = 4096  # bpe only: 256 byte symbols + the end-of-text token + merges
    path: str | None = None  # pretrained: tokenizer.json file or HF tokenizer directory
    eos_token: str | None = None  # pretrained: end-of-text token; None -> the tokenizer's own


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" | "hf"
    # hf: arguments to datasets.load_dataset
    path: str | None = None  # "text" | "json" | "csv" | "parquet" | a hub dataset name
    name: str | None = None
    data_files: Any | None = None  # str | list | dict
    split: str | None = None  # load_dataset split, e.g. "train" or "train[:10%]"; None pools all splits
    load_kwargs: dict[str, Any] = field(default_factory=dict)  # more load_dataset kwargs, e.g. sample_by
    text_column: str = "text"
    max_documents: int | None = None  # limit (handy for a quick run)
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0  # salt of the hash that assigns documents to splits
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seq_len: int = 128  # blocks hold seq_len + 1 tokens (inputs and shifted targets)
    batch_size: int = 16
    eval_batch_size: int | None = None  # None -> batch_size
    num_workers: int = 0
    seed: int = 0  # train shuffle seed
    cache_dir: str = DEFAULT_CACHE_DIR  # env DISTILL_CACHE overrides the default

    def validate(self) -> DataConfig:
        """Check the values a build needs; raise ConfigError naming the key to fix; return self.

        The app layer calls it once per run; the builders (`build_corpus`, `build_tokenizer`,
        `LMDataModule`) take the config as given.
        """
        if self.source not in ("stdlib", "hf"):
            raise ConfigError("data.source", f"unknown source {self.source!r}.", "use 'stdlib' or 'hf'.")
        if self.source == "hf" and not self.path:
            raise ConfigError(
                "data.path", "source 'hf' needs a dataset.", "set it to 'text', 'json', 'parquet' or a hub name."
            )
        for key, value in (("val_fraction", self.val_fraction), ("test_fraction", self.test_fraction)):
            if not 0.0 < value < 1.0:
                raise ConfigError(f"data.{key}", f"must lie strictly between 0 and 1, got {value}.")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("data.val_fraction", "val_fraction + test_fraction leaves no training data.")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError("data.max_documents", f"must be positive or null, got {self.max_documents}.")
        for key in ("seq_len", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}", f"must be positive, got {getattr(self, key)}.")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError("data.eval_batch_size", f"must be positive or null, got {self.eval_batch_size}.")
        tok = self.tokenizer
        if tok.kind not in ("bpe", "bytes", "pretrained"):
            raise ConfigError(
                "data.tokenizer.kind", f"unknown kind {tok.kind!r}.", "use bpe, bytes or pretrained."
            )
        if tok.kind == "bpe" and tok.vocab_size < 257:
            raise ConfigError(
                "data.tokenizer.vocab_size",
                f"a byte-level BPE needs at least 257 entries (256 bytes + end-of-text), got {tok.vocab_size}.",
            )
        if tok.kind == "pretrained" and not tok.path:
            raise ConfigError(
                "data.tokenizer.path", "kind 'pretrained' needs a tokenizer.json file or tokenizer directory."
            )
        return self


def cache_root(cfg: DataConfig) -> Path:
    """The cache directory: `data.cache_dir`, or $DISTILL_CACHE when the key is left at its default."""
    path = cfg.cache_dir
    if path == DEFAULT_CACHE_DIR and os.environ.get("DISTILL_CACHE"):
        path = os.environ["DISTILL_CACHE"]
    return Path(path).expanduser()


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts: the cache keys of this package."""
    blob = json.dumps([PIPELINE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
