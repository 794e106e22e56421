"""Tokenize documents and pack them into fixed blocks of seq_len + 1 tokens.

Each document's tokens are followed by the end-of-text token; the documents of a split, in order, form
one token stream cut into consecutive blocks (the last partial block is dropped). Both steps are cached
by the datasets library under explicit fingerprints (input fingerprint + tokenizer + block length), so a
second run neither re-tokenizes nor re-packs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, List, Value

from distill.data.config import digest
from distill.data.tokenizer import TextTokenizer
from distill.errors import ConfigError

_TOKENS = Features({"input_ids": List(Value("int32"))})


def _encode_batch(texts: list[str], tokenizer: TextTokenizer) -> dict[str, list[list[int]]]:
    """map() function: each document's token ids followed by end-of-text."""
    ids = tokenizer.encode_batch(texts)
    for doc in ids:
        doc.append(tokenizer.eos_id)
    return {"input_ids": ids}


def tokenize_corpus(corpus: DatasetDict, tokenizer: TextTokenizer) -> DatasetDict:
    """Per split, one row per document: "input_ids" (list of int32, ending in end-of-text)."""
    return DatasetDict(
        {
            split: docs.map(
                _encode_batch,
                batched=True,
                input_columns="text",
                remove_columns=docs.column_names,
                fn_kwargs={"tokenizer": tokenizer},
                features=_TOKENS,
                new_fingerprint=digest("tokens", docs._fingerprint, tokenizer.fingerprint),
                desc=f"Tokenizing {split}",
            )
            for split, docs in corpus.items()
        }
    )


def iter_blocks(chunks: Iterable[np.ndarray], block_len: int) -> Iterator[np.ndarray]:
    """Cut a token stream, given as chunks of any sizes, into consecutive blocks of `block_len` tokens."""
    carry = np.empty(0, dtype=np.int32)
    for chunk in chunks:
        stream = np.concatenate([carry, chunk])
        n = len(stream) // block_len
        yield from stream[: n * block_len].reshape(n, block_len)
        carry = stream[n * block_len :]


def _token_chunks(tokens: Dataset, batch_size: int = 1000) -> Iterator[np.ndarray]:
    """The concatenated "input_ids" of a tokenized split, a batch of documents at a time."""
    for table in tokens.with_format("arrow").iter(batch_size=batch_size):
        yield pc.list_flatten(table.column("input_ids")).to_numpy()


def _generate_blocks(tokens: Dataset, block_len: int) -> Iterator[dict[str, np.ndarray]]:
    for block in iter_blocks(_token_chunks(tokens), block_len):
        yield {"input_ids": block}


def total_length(ds: Dataset, column: str) -> int:
    """Sum over rows of len(column): tokens of a list column, UTF-8 bytes of a string column."""
    total = 0
    for table in ds.with_format("arrow").iter(batch_size=10_000):
        col = table.column(column)
        lengths = pc.list_value_length(col) if pa.types.is_list(col.type) else pc.binary_length(col)
        total += pc.sum(lengths).as_py() or 0
    return total


def pack_corpus(tokens: DatasetDict, seq_len: int, cache_dir: str | Path) -> DatasetDict:
    """Per split, rows of "input_ids" holding seq_len + 1 consecutive tokens of the split's stream."""
    block_len = seq_len + 1
    features = Features({"input_ids": List(Value("int32"), length=block_len)})
    blocks = {}
    for split, ds in tokens.items():
        n_tokens = total_length(ds, "input_ids")
        if n_tokens < block_len:
            raise ConfigError(
                "data.seq_len",
                f"the {split} split has {n_tokens} tokens, fewer than one block of seq_len + 1 = {block_len}.",
                "lower data.seq_len, raise data.val_fraction / data.test_fraction, or use a larger corpus.",
            )
        blocks[split] = Dataset.from_generator(
            _generate_blocks,
            features=features,
            gen_kwargs={"tokens": ds, "block_len": block_len},
            cache_dir=str(cache_dir),
            fingerprint=digest("blocks", ds._fingerprint, block_len),
            split=split,
        )
    return DatasetDict(blocks)
