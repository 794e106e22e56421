"""The text side of VL-MoE: a BPE trained on the training texts (cached), and padding to fixed-length rows.

The tokenizer splits on spaces the SentencePiece way (a space becomes "▁" on the word that follows it),
so `decode(encode(text))` gives back the text for every character seen in training (others become
[UNK]). Special tokens [PAD] [CLS] [SEP] [MASK] [UNK] get ids 0..4. `save(dir)` writes a tokenizer.json
that `tokenizers.Tokenizer.from_file` (and `transformers.PreTrainedTokenizerFast`) reads back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from distill.data.config import digest
from distill.data.tokenizer import save_tokenizer

logger = logging.getLogger(__name__)

PAD, CLS, SEP, MASK, UNK = "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"
SPECIAL_TOKENS = (PAD, CLS, SEP, MASK, UNK)  # ids 0..4, in this order
KIND = "bpe-metaspace-v1"  # bump when a change here changes what a trained tokenizer holds


class VLTextTokenizer:
    """A `tokenizers.Tokenizer` with the ids of its special tokens and a fingerprint of its definition."""

    def __init__(self, backend: Tokenizer):
        ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the special tokens {missing}")
        self.backend = backend
        self.pad_id: int = ids[PAD]
        self.cls_id: int = ids[CLS]
        self.sep_id: int = ids[SEP]
        self.mask_id: int = ids[MASK]
        self.unk_id: int = ids[UNK]
        self.vocab_size: int = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self.fingerprint: str = digest(backend.to_str())
        self.backend.encode_special_tokens = True  # a text "[MASK]" is text, not the token

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special tokens ([CLS], [PAD], ...) are left out."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> Path:
        return save_tokenizer(self.backend, directory)

    def __repr__(self) -> str:
        return f"VLTextTokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, cls={self.cls_id})"


def train_or_load_text(
    texts: Iterable[str] | None, vocab_size: int, cache_dir: str | os.PathLike, fingerprint: str
) -> tuple[VLTextTokenizer, bool]:
    """The BPE of `vocab_size` trained on `texts`, and whether it came from the cache rather than training.

    Cached under `cache_dir`/vl_tokenizers, keyed by `fingerprint` (of the data the texts come from) and
    the settings; `texts` is not read when the cache holds it (it may then be None).
    """
    name = f"bpe-{vocab_size}-{digest(KIND, fingerprint, vocab_size)}"
    path = Path(cache_dir).expanduser() / "vl_tokenizers" / name / "tokenizer.json"
    if path.is_file():
        logger.info("text tokenizer: cached %s", path)
        return VLTextTokenizer(Tokenizer.from_file(str(path))), True
    if texts is None:
        raise ValueError(f"no texts to train the tokenizer on and no cached one at {path}")
    start = time.perf_counter()
    backend = _train_bpe(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tokenizer.{os.getpid()}.json")  # atomic: readers never see a partial file
    backend.save(str(tmp))
    os.replace(tmp, path)
    tok = VLTextTokenizer(Tokenizer.from_file(str(path)))  # the same object a cached run gets
    logger.info("text tokenizer: trained %r in %.1f s, saved %s", tok, time.perf_counter() - start, path)
    return tok, False


def _train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return backend


def pad_texts(ids: Sequence[Sequence[int]], max_len: int, cls_id: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Rows [CLS] + ids, truncated to max_len and right-padded: (ids long [N, max_len], mask bool [N, max_len]).

    The mask is True on real tokens, [CLS] included.
    """
    out = torch.full((len(ids), max_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), max_len), dtype=torch.bool)
    for row, tokens in enumerate(ids):
        tokens = [cls_id, *tokens[: max_len - 1]]
        out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = True
    return out, mask


def encode_padded(tok: VLTextTokenizer, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
    """`pad_texts` of the texts' tokens."""
    return pad_texts(tok.encode_batch(texts), max_len, tok.cls_id, tok.pad_id)
