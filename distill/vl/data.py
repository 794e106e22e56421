"""The VL-MoE data module: image-only, text-only and image-text batches for masked data modeling.

`setup` builds (or loads from the cache) the dataset (`distill.data.scenes.build_scenes`), a text BPE
trained on the train texts (`distill.vl.text_tokenizer`), the image tokenizer fitted on the train images
(`distill.data.image_tokenizer.train_or_load`), every split's images decoded once to uint8 (cached as .npy
under <cache>/vl_images) and their visual tokens. Batches come out unmasked; the LightningModule masks.

The train stream is a pure function of (seed, position): batch k has kind KINDS[k % 3] and takes the next
`batch_size` examples of that kind's own stream, seeded permutations of the train split (a new one per
pass). `state_dict` holds the count of batches handed out, so a restored module continues with the next
one. The train loader has a length (an epoch: each kind passes over the train split about once), so
Lightning does not fetch a batch ahead: every batch handed out is consumed before a checkpoint is taken.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from datasets import Dataset, Image
from PIL import Image as PILImage
from torch import Tensor

from distill.data.config import SPLITS, digest
from distill.data.corpus import corpus_fingerprint
from distill.data.image_tokenizer import mean_patch_error, train_or_load
from distill.data.scenes import ANSWERS, build_scenes
from distill.data.vl_config import VLDataConfig, vl_cache_root
from distill.vl.sets import RetrievalSet, VQASet, trim_padding
from distill.vl.text_tokenizer import encode_padded, train_or_load_text

logger = logging.getLogger(__name__)

KINDS = ("image", "text", "pair")
_ENCODE_CHUNK = 4096  # images per image-tokenizer call


def to_signed(images: Tensor) -> Tensor:
    """uint8 images -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def decode_images(dataset: Dataset, size: int) -> np.ndarray:
    """The "image" column as uint8 [N, 3, size, size] (converted to RGB, resized when another size)."""
    out = np.empty((len(dataset), 3, size, size), dtype=np.uint8)
    raw = dataset.select_columns(["image"]).cast_column("image", Image(decode=False))
    row = 0
    for batch in raw.iter(batch_size=1000):
        for image in batch["image"]:
            data = image["bytes"] if image.get("bytes") is not None else Path(image["path"]).read_bytes()
            with PILImage.open(io.BytesIO(data)) as img:
                rgb = img.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), PILImage.Resampling.BICUBIC)
            out[row] = np.asarray(rgb).transpose(2, 0, 1)
            row += 1
    return out


def cached_array(path: Path, make: Callable[[], np.ndarray]) -> Tensor:
    """make(), saved once as the .npy file `path` (atomically) and read from there afterwards."""
    if path.is_file():
        return torch.from_numpy(np.load(path))
    array = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")  # readers never see a partial file
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
    return torch.from_numpy(array)


def _train_texts(train: Dataset) -> Iterator[str]:
    """Every caption, question and distractor of the train split (the text tokenizer's training data)."""
    columns = [c for c in ("caption", "questions", "distractors") if c in train.column_names]
    for batch in train.select_columns(columns).iter(batch_size=1000):
        for column in columns:
            for value in batch[column]:
                yield from [value] if isinstance(value, str) else value


class VLDataModule(L.LightningDataModule):
    """Masked-data-modeling batches of kinds "image", "text" and "pair" (see the module docstring)."""

    def __init__(self, cfg: VLDataConfig, seed: int = 0):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.corpus = None  # the VL data has no text corpus (read by code shared with the LM pipeline)
        self.num_answers: int | None = None
        self._built = False
        self._position = 0  # train batches handed out (= consumed: the loader has a length, see above)
        self._orders: dict[tuple[int, int], Tensor] = {}
        self._stats: dict[str, Any] | None = None

    def prepare_data(self) -> None:
        self._build()

    def setup(self, stage: str | None = None) -> None:
        self._build()

    def _build(self) -> None:
        if self._built:
            return
        cfg, root, start = self.cfg, vl_cache_root(self.cfg), time.perf_counter()
        self.data = data = build_scenes(cfg)
        data_fp = corpus_fingerprint(data)
        tick = time.perf_counter()
        self.tokenizer, self.text_tokenizer_cached = train_or_load_text(
            _train_texts(data["train"]), cfg.vocab_size, root, data_fp
        )
        logger.info("vl data: text tokenizer in %.1f s", time.perf_counter() - tick)
        tick, arrays = time.perf_counter(), root / "vl_arrays"
        keys = {split: digest("vl-images", data[split]._fingerprint, cfg.image_size) for split in SPLITS}
        self.images = {
            split: cached_array(arrays / f"images-{keys[split]}.npy", partial(decode_images, data[split], cfg.image_size))
            for split in SPLITS
        }
        logger.info("vl data: images decoded in %.1f s (%s)", time.perf_counter() - tick,
                    {s: tuple(x.shape) for s, x in self.images.items()})
        tick = time.perf_counter()
        self.image_tokenizer, self.image_tokenizer_cached = train_or_load(
            self.images["train"], cfg.image_tokenizer, root, digest(data_fp, cfg.image_size)
        )
        self.visual_tokens = {
            split: cached_array(arrays / f"tokens-{digest(keys[split], self.image_tokenizer.fingerprint)}.npy",
                                partial(self._encode_images, images))
            for split, images in self.images.items()
        }
        logger.info("vl data: image tokenizer and visual tokens in %.1f s", time.perf_counter() - tick)
        tok = self.tokenizer
        self.vocab_size, self.visual_vocab_size = tok.vocab_size, self.image_tokenizer.codebook_size
        self.pad_id, self.cls_id, self.sep_id, self.mask_id = tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id
        self.image_size, self.patch_size = cfg.image_size, self.image_tokenizer.patch_size
        self.captions = {split: self.encode_texts(data[split]["caption"]) for split in SPLITS}
        if "answer_ids" in data["train"].column_names:
            self.num_answers = len(ANSWERS)
        self.fingerprint = digest(data_fp, cfg.image_size, tok.fingerprint, self.image_tokenizer.fingerprint)
        self._built = True
        logger.info("vl data: ready in %.1f s: %s", time.perf_counter() - start, self.summary())

    def _encode_images(self, images: Tensor) -> np.ndarray:
        return torch.cat([self.image_tokenizer.encode(x) for x in images.split(_ENCODE_CHUNK)]).numpy()

    def encode_texts(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """[CLS] + tokens, truncated and right-padded to data.max_text_len: (ids long [N, L], mask bool [N, L])."""
        return encode_padded(self.tokenizer, texts, self.cfg.max_text_len)

    def stats(self) -> dict[str, Any]:
        """Examples per split, vocabulary sizes, and the image tokenizer's MSE on the validation images."""
        if self._stats is None:
            val = self.images["validation"]
            self._stats = {
                "examples": {split: len(x) for split, x in self.images.items()}, "vocab_size": self.vocab_size,
                "visual_vocab_size": self.visual_vocab_size, "max_text_len": self.cfg.max_text_len,
                "image_tokenizer_mse": self.image_tokenizer.reconstruction_error(val),
                "mean_patch_mse": mean_patch_error(val, self.patch_size),
            }
        return self._stats

    def summary(self) -> str:
        s, n = self.stats(), self.stats()["examples"]
        return (
            f"{self.cfg.source}: {n['train']}/{n['validation']}/{n['test']} train/val/test examples of "
            f"{self.image_size}px; text vocab {s['vocab_size']} (max {s['max_text_len']} tokens), "
            f"visual vocab {s['visual_vocab_size']} ({self.patch_size}px patches), validation reconstruction "
            f"MSE {s['image_tokenizer_mse']:.5f} (mean-patch baseline {s['mean_patch_mse']:.5f})"
        )

    def batch(self, split: str, kind: str, index: Tensor) -> dict[str, Any]:
        """The batch of `kind` made of the examples `index` of `split`."""
        out: dict[str, Any] = {"kind": kind}
        if kind != "text":
            out["images"] = to_signed(self.images[split][index])
            out["visual_tokens"] = self.visual_tokens[split][index]
        if kind != "image":
            ids, mask = self.captions[split]
            out["text_ids"], out["text_mask"] = trim_padding(ids[index], mask[index])
        return out

    def _order(self, kind: int, epoch: int) -> Tensor:
        """The permutation of the train split that `kind` walks in its pass `epoch`."""
        if (kind, epoch) not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[1] >= epoch - 1}  # passes behind: done
            gen = torch.Generator().manual_seed(int(digest("vl-train", self.seed, KINDS[kind], epoch), 16) % 2**63)
            self._orders[kind, epoch] = torch.randperm(len(self.images["train"]), generator=gen)
        return self._orders[kind, epoch]

    def train_batch(self, position: int) -> dict[str, Any]:
        """Batch number `position` of the train stream (a pure function of the seed and the position)."""
        kind, step = position % len(KINDS), position // len(KINDS)
        n, size = len(self.images["train"]), self.cfg.batch_size
        slots = torch.arange(step * size, (step + 1) * size)
        passes, offsets = slots // n, slots % n
        index = torch.empty_like(slots)
        for p in passes.unique().tolist():
            here = passes == p
            index[here] = self._order(kind, p)[offsets[here]]
        return self.batch("train", KINDS[kind], index)

    @property
    def epoch_batches(self) -> int:
        """Train batches per epoch: each kind passes over the train split about once."""
        return len(KINDS) * math.ceil(len(self.images["train"]) / self.cfg.batch_size)

    def train_dataloader(self) -> _TrainStream:
        self._build()
        return _TrainStream(self)

    def val_dataloader(self) -> _EvalStream:
        self._build()
        return _EvalStream(self, "validation")

    def test_dataloader(self) -> _EvalStream:
        self._build()
        return _EvalStream(self, "test")

    def state_dict(self) -> dict[str, Any]:
        """The train stream's position (batches consumed), with what the stream depends on."""
        return {"position": self._position, "seed": self.seed, "batch_size": self.cfg.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size"):
            if key in state and state[key] != self.state_dict()[key]:
                logger.warning("vl data: the checkpoint's %s is %s, now %s: the train stream changes",
                               key, state[key], self.state_dict()[key])
        self._position = int(state.get("position", 0))

    def vqa_set(self, split: str) -> VQASet | None:
        """One row per (image, question) of `split`; None when the source has no questions."""
        self._build()
        data = self.data[split]
        if "questions" not in data.column_names:
            return None
        rows = data.select_columns(["questions", "answer_ids"]).to_dict()
        scene = torch.tensor([i for i, qs in enumerate(rows["questions"]) for _ in qs], dtype=torch.long)
        ids, mask = self.encode_texts([q for qs in rows["questions"] for q in qs])
        answers = torch.tensor([a for ans in rows["answer_ids"] for a in ans], dtype=torch.long)
        return VQASet(to_signed(self.images[split][scene]), ids, mask, answers)

    def retrieval_set(self, split: str) -> RetrievalSet:
        """The images of `split` with their captions and (scenes) their distractor captions."""
        self._build()
        data, (ids, mask) = self.data[split], self.captions[split]
        n, length = ids.shape
        distractors = data["distractors"] if "distractors" in data.column_names else [[] for _ in range(n)]
        k = min((len(d) for d in distractors), default=0)
        if any(len(d) != k for d in distractors):
            logger.info("vl data: %s retrieval keeps the first %d distractors of each image", split, k)
        flat_ids, flat_mask = self.encode_texts([text for d in distractors for text in d[:k]])
        images = to_signed(self.images[split])
        return RetrievalSet(images, ids, mask, flat_ids.view(n, k, length), flat_mask.view(n, k, length))


class _TrainStream:
    """The train loader: `len` batches per pass, from the data module's position on (Lightning's `_Stateful`)."""

    def __init__(self, dm: VLDataModule):
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.epoch_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dm = self.dm
        for _ in range(len(self)):
            batch = dm.train_batch(dm._position)
            dm._position += 1  # handed out = consumed: Lightning does not prefetch from a loader with a length
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.dm.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dm.load_state_dict(state)


class _EvalStream:
    """A split in order: each chunk of batch_size examples as an "image", a "text" and a "pair" batch."""

    def __init__(self, dm: VLDataModule, split: str):
        self.dm, self.split = dm, split

    def __len__(self) -> int:
        return len(KINDS) * math.ceil(len(self.dm.images[self.split]) / self.dm.cfg.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = len(self.dm.images[self.split])
        for index in torch.arange(n).split(self.dm.cfg.batch_size):
            for kind in KINDS:
                yield self.dm.batch(self.split, kind, index)
