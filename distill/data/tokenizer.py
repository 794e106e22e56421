"""Tokenizers: byte-level BPE trained on the corpus (cached), plain bytes, or a pretrained one.

All three are a `tokenizers.Tokenizer` behind `TextTokenizer`, so `save(dir)` always writes a
tokenizer.json that `tokenizers.Tokenizer.from_file` (and `transformers.AutoTokenizer`) reads back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from distill.data.config import (
    EOS_TOKEN,
    DataConfig,
    TokenizerConfig,
    cache_root,
    digest,
)
from distill.data.corpus import corpus_fingerprint
from distill.errors import ConfigError

logger = logging.getLogger(__name__)

# End-of-text tokens of common pretrained tokenizers, tried in order when none is configured.
KNOWN_EOS_TOKENS = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


def save_tokenizer(backend: Tokenizer, directory: str | os.PathLike) -> Path:
    """Write `directory`/tokenizer.json (what `Tokenizer.from_file` and transformers read); return its path."""
    path = Path(directory) / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    backend.save(str(path))
    return path


class TextTokenizer:
    """A `tokenizers.Tokenizer` with its end-of-text id and a fingerprint of its whole definition."""

    def __init__(self, backend: Tokenizer, eos_token: str, kind: str):
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise ConfigError(
                "data.tokenizer.eos_token", f"{eos_token!r} is not in the tokenizer's vocabulary."
            )
        self.backend = backend
        self.kind = kind
        self.eos_token = eos_token
        self.eos_id: int = eos_id
        self.vocab_size: int = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self.fingerprint: str = digest(backend.to_str(), eos_token)
        # A document that contains the text "<|endoftext|>" is encoded as that text, not as the token.
        self.backend.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> Path:
        return save_tokenizer(self.backend, directory)

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind}, vocab_size={self.vocab_size}, eos={self.eos_token!r}={self.eos_id})"


def build_tokenizer(cfg: DataConfig, corpus: DatasetDict) -> TextTokenizer:
    """The tokenizer `cfg.tokenizer` names; a BPE is trained on corpus["train"] once and then cached."""
    kind = cfg.tokenizer.kind
    if kind == "bytes":
        return TextTokenizer(byte_tokenizer(), EOS_TOKEN, "bytes")
    if kind == "pretrained":
        return load_pretrained(cfg.tokenizer)
    vocab_size = cfg.tokenizer.vocab_size
    path = (
        cache_root(cfg) / "tokenizers" / f"bpe-{vocab_size}-{corpus_fingerprint(corpus)}" / "tokenizer.json"
    )
    if path.is_file():
        logger.info("tokenizer: cached BPE %s", path)
    else:
        start = time.perf_counter()
        logger.info(
            "tokenizer: training a byte-level BPE (vocab %d) on %d documents",
            vocab_size,
            len(corpus["train"]),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tokenizer.{os.getpid()}.json")  # atomic: readers never see a partial file
        _train_bpe(corpus["train"], vocab_size).save(str(tmp))
        os.replace(tmp, path)
        logger.info("tokenizer: trained in %.1f s, saved %s", time.perf_counter() - start, path)
    return TextTokenizer(Tokenizer.from_file(str(path)), EOS_TOKEN, "bpe")  # the same object on every run


def _byte_level(backend: Tokenizer) -> Tokenizer:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _train_bpe(train: Dataset, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on the "text" column; the end-of-text token gets id 0."""
    backend = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=logger.isEnabledFor(logging.INFO),
    )
    batches = (batch["text"] for batch in train.iter(batch_size=1000))
    backend.train_from_iterator(batches, trainer, length=len(train))
    return backend


def byte_symbols() -> list[str]:
    """The printable character ByteLevel uses for each byte value 0..255 (GPT-2's byte-to-unicode map)."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def byte_tokenizer() -> Tokenizer:
    """Plain UTF-8 bytes: token id = byte value, end-of-text = 256."""
    vocab = {symbol: b for b, symbol in enumerate(byte_symbols())}
    backend = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    backend.add_special_tokens([EOS_TOKEN])
    return backend


def load_pretrained(cfg: TokenizerConfig) -> TextTokenizer:
    """A tokenizer.json file, or a tokenizer directory (Hugging Face `save_pretrained`)."""
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ConfigError(
            "data.tokenizer.path",
            f"{path} does not exist.",
            "point it at a tokenizer.json or a tokenizer directory.",
        )
    eos = cfg.eos_token
    try:
        if path.is_file():
            backend = Tokenizer.from_file(str(path))
        else:
            from transformers import AutoTokenizer  # slow to import: only when a directory is given

            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            backend, eos = hf.backend_tokenizer, eos or hf.eos_token
    except Exception as err:  # the libraries raise many types for a file that is not a tokenizer
        raise ConfigError("data.tokenizer.path", f"cannot load a tokenizer from {path}: {err}") from err
    eos = eos or next((t for t in KNOWN_EOS_TOKENS if backend.token_to_id(t) is not None), None)
    if eos is None:
        raise ConfigError(
            "data.tokenizer.eos_token",
            f"the tokenizer at {path} has none of the usual end-of-text tokens {KNOWN_EOS_TOKENS}.",
            "set data.tokenizer.eos_token to its end-of-text token.",
        )
    logger.info("tokenizer: pretrained %s (end-of-text %r)", path, eos)
    return TextTokenizer(backend, eos, "pretrained")
