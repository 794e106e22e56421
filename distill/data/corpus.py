"""Corpora: the embedded stdlib corpus or any `datasets.load_dataset` call, split into train/validation/test.

Each document goes to a split by a salted hash of its key (a stdlib file's path relative to the stdlib
root, an HF document's text), so the split is deterministic, independent of order, and identical documents
never straddle two splits. Every step is cached by the datasets library under explicit fingerprints.
"""

from __future__ import annotations

import codecs
import functools
import glob
import hashlib
import logging
import os
import re
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, Features, Value

from distill.data.config import SPLITS, DataConfig, cache_root, digest
from distill.errors import ConfigError

logger = logging.getLogger(__name__)

LOCAL_BUILDERS = ("text", "json", "csv", "parquet", "arrow")  # load_dataset builders that read data_files
TEXT_BUILDERS = ("text", "json", "csv")  # of those, the ones that decode text files (scanned for bad UTF-8)
_ESCAPED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of each byte that is not UTF-8
_TEXT = Features({"text": Value("string")})


def unit_hash(key: str, salt: Any) -> float:
    """A uniform number in [0, 1) from a salted hash of `key` (stable across runs and machines)."""
    h = hashlib.blake2b(f"{salt}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def split_of(key: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split ("train", "validation" or "test") a document with this key belongs to."""
    u = unit_hash(key, seed)
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + val_fraction else "train"


def invalid_utf8_bytes(chunks: Iterable[bytes]) -> int:
    """How many bytes of a stream (given in chunks) are not valid UTF-8, i.e. get replaced by U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    count = sum(len(_ESCAPED.findall(decoder.decode(chunk))) for chunk in chunks)
    return count + len(_ESCAPED.findall(decoder.decode(b"", final=True)))


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8 with errors="replace"; also return how many bytes were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), invalid_utf8_bytes([data])


def corpus_fingerprint(corpus: DatasetDict) -> str:
    """One fingerprint for the three splits (what a tokenizer trained on them is cached by)."""
    return digest(*(corpus[split]._fingerprint for split in SPLITS))


def build_corpus(cfg: DataConfig) -> DatasetDict:
    """The corpus of `cfg` as splits "train", "validation", "test" with one column "text" (cached)."""
    start = time.perf_counter()
    corpus = _stdlib_corpus(cfg) if cfg.source == "stdlib" else _hf_corpus(cfg)
    for split in SPLITS:
        if len(corpus[split]) == 0:
            raise ConfigError(
                _split_size_key(cfg, split),
                f"the {split} split has no documents.",
                "use more documents or larger data.val_fraction / data.test_fraction.",
            )
    sizes = ", ".join(f"{split} {len(corpus[split])}" for split in SPLITS)
    logger.info("corpus (%s): %s documents, ready in %.1f s", cfg.source, sizes, time.perf_counter() - start)
    return corpus


def _split_size_key(cfg: DataConfig, split: str) -> str:
    """The config key that sets how many documents a split gets."""
    if split == "validation":
        return "data.val_fraction"
    if split == "test":
        return "data.test_fraction"
    if cfg.max_documents is not None:
        return "data.max_documents"
    return "data.data_files" if cfg.source == "hf" and cfg.data_files else "data.path"


# --- the embedded default: the running interpreter's standard library ---------------------------------


def stdlib_files(root: Path) -> list[tuple[str, int, int]]:
    """(path relative to root, size, mtime_ns) of the non-empty stdlib .py files, in a hashed order.

    The hashed order makes a `max_documents` prefix a representative sample instead of the files whose
    names come first. Third-party packages (site-packages) are not part of the standard library.
    """
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or not path.is_file():
            continue
        stat = path.stat()
        if stat.st_size > 0:
            files.append((rel.as_posix(), stat.st_size, stat.st_mtime_ns))
    return sorted(files, key=lambda f: (unit_hash(f[0], "order"), f[0]))


def _read_files(root: str, files: list[str]) -> Iterator[dict[str, str]]:
    """Yield each file as a document; bytes that are not UTF-8 become U+FFFD and are reported."""
    for rel in files:
        text, replaced = decode_utf8((Path(root) / rel).read_bytes())
        if replaced:
            logger.warning("corpus: %s: %d bytes are not UTF-8, replaced by U+FFFD", rel, replaced)
        yield {"text": text}


def _stdlib_corpus(cfg: DataConfig) -> DatasetDict:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)[: cfg.max_documents]
    logger.info(
        "corpus: %d stdlib files (%.1f MB) of Python %s from %s",
        len(files),
        sum(f[1] for f in files) / 1e6,
        sys.version.split()[0],
        root,
    )
    cache = str(cache_root(cfg) / "datasets")
    splits = {}
    for split in SPLITS:
        chosen = [
            f for f in files if split_of(f[0], cfg.split_seed, cfg.val_fraction, cfg.test_fraction) == split
        ]
        if not chosen:
            raise ConfigError(_split_size_key(cfg, split), f"the {split} split has no documents.")
        splits[split] = Dataset.from_generator(
            _read_files,
            features=_TEXT,
            gen_kwargs={"root": str(root), "files": [f[0] for f in chosen]},
            cache_dir=cache,
            fingerprint=digest("stdlib", sys.version, str(root), chosen),
            split=split,
        )
    return DatasetDict(splits)


# --- any datasets.load_dataset call ---------------------------------------------------------------------


def _local_files(data_files: Any) -> list[Path]:
    """The local files `data.data_files` names (str, list or dict of them, glob patterns allowed)."""
    if data_files is None:
        raise ConfigError("data.data_files", "a local dataset needs files.", "set data.data_files to a path.")
    if isinstance(data_files, str):
        patterns = [data_files]
    elif isinstance(data_files, dict):
        patterns = [p for v in data_files.values() for p in ([v] if isinstance(v, str) else v)]
    else:
        patterns = list(data_files)
    files = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(str(pattern)), recursive=True))
        matches = [p for p in matches if p.is_file()]
        if not matches:
            raise ConfigError("data.data_files", f"no file matches {pattern!r} (cwd {os.getcwd()}).")
        for path in matches:
            if path.stat().st_size == 0:
                raise ConfigError("data.data_files", f"{path} is empty.")
        files += matches
    return files


def _scan_utf8(files: list[Path]) -> int:
    """Count the bytes that are not UTF-8 in each file, report them, and return the total."""
    total = 0
    for path in files:
        with open(path, "rb") as f:
            replaced = invalid_utf8_bytes(iter(functools.partial(f.read, 1 << 20), b""))
        if replaced:
            logger.warning("corpus: %s: %d bytes are not UTF-8, replaced by U+FFFD", path, replaced)
        total += replaced
    return total


def _in_split(texts: list[str | None], split: str, seed: int, val: float, test: float) -> list[bool]:
    """Filter: the non-blank documents that hash to `split`."""
    return [bool(t and not t.isspace()) and split_of(t, seed, val, test) == split for t in texts]


def _hf_corpus(cfg: DataConfig) -> DatasetDict:
    kwargs = dict(cfg.load_kwargs)
    if cfg.path in LOCAL_BUILDERS:
        files = _local_files(cfg.data_files)
        logger.info(
            "corpus: %d local %s files (%.1f MB)",
            len(files),
            cfg.path,
            sum(f.stat().st_size for f in files) / 1e6,
        )
        if cfg.path in TEXT_BUILDERS and _scan_utf8(files):
            kwargs.setdefault("encoding_errors", "replace")
            if cfg.path == "json":  # the json builder applies encoding_errors only when encoding != "utf-8"
                kwargs.setdefault("encoding", "utf8")
    key = "data.data_files" if cfg.path in LOCAL_BUILDERS else "data.path"
    try:
        loaded = datasets.load_dataset(
            cfg.path,
            cfg.name,
            data_files=cfg.data_files,
            split=cfg.split,
            cache_dir=str(cache_root(cfg) / "datasets"),
            **kwargs,
        )
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise ConfigError(key, f"datasets.load_dataset({cfg.path!r}) failed: {err}") from err
    if isinstance(loaded, DatasetDict):  # no `split` given: pool every split the dataset has
        loaded = datasets.concatenate_datasets(list(loaded.values()))
    if cfg.text_column not in loaded.column_names:
        raise ConfigError(
            "data.text_column",
            f"the dataset has no column {cfg.text_column!r}; its columns are {loaded.column_names}.",
            "set data.text_column to the column that holds the text.",
        )
    feature = loaded.features[cfg.text_column]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise ConfigError("data.text_column", f"column {cfg.text_column!r} holds {feature}, not text.")
    docs = loaded.select_columns([cfg.text_column])
    if cfg.text_column != "text":
        docs = docs.rename_column(cfg.text_column, "text")
    if cfg.max_documents is not None:
        docs = docs.select(range(min(cfg.max_documents, len(docs))))
    hashing = {"seed": cfg.split_seed, "val": cfg.val_fraction, "test": cfg.test_fraction}
    return DatasetDict(
        {
            split: docs.filter(
                _in_split,
                batched=True,
                input_columns="text",
                fn_kwargs={"split": split, **hashing},
                new_fingerprint=digest("split", docs._fingerprint, split, hashing),
                desc=f"Selecting {split} documents",
            )
            for split in SPLITS
        }
    )
