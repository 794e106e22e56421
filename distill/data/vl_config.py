"""Vision-language data configuration (the `data` node of `task=vl`: conf/data/scenes.yaml, imagefolder.yaml) and its checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from distill.data.config import DEFAULT_CACHE_DIR, DataConfig, cache_root
from distill.data.image_tokenizer import ImageTokenizerConfig
from distill.errors import ConfigError

SOURCES = ("scenes", "imagefolder", "hub")


@dataclass
class VLDataConfig:
    source: str = "scenes"  # "scenes" (rendered here) | "imagefolder" (a directory) | "hub" (load_dataset)
    # imagefolder: a directory of images with a metadata.jsonl ({"file_name": ..., <text_column>: ...});
    # hub: a load_dataset name or a local dataset directory (parquet, arrow, ...)
    path: Optional[str] = None  # noqa: UP045 (OmegaConf reads the annotation)
    name: Optional[str] = None  # noqa: UP045 # hub: load_dataset config name
    split: Optional[str] = None  # noqa: UP045 # hub/imagefolder: load_dataset split; None pools all splits
    image_column: str = "image"
    text_column: str = "text"  # imagefolder/hub: the caption column
    # scenes
    num_scenes: int = 20000
    image_size: int = 32  # pixels (square)
    grid: int = 3  # objects sit in distinct cells of a grid x grid layout (no overlaps)
    min_objects: int = 2
    max_objects: int = 4
    num_distractors: int = 4  # captions that differ from the true one in one attribute or relation
    qa_per_scene: int = 6
    seed: int = 0  # scene i is rendered from a seed derived from (seed, i)
    # all sources: examples go to a split by a salted hash of their seed (scenes) or image bytes
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0
    # tokenizers: visual tokens (a patch codebook fitted on the train images) and a text BPE
    image_tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    vocab_size: int = 1000  # text BPE, trained on the train captions, questions and distractors
    max_text_len: int = 40  # tokens per text, [CLS] included; longer texts are truncated
    batch_size: int = 64
    num_workers: int = 0
    cache_dir: str = DEFAULT_CACHE_DIR  # env DISTILL_CACHE overrides the default

    def __post_init__(self) -> None:
        if isinstance(self.image_tokenizer, Mapping):  # VLDataConfig(**OmegaConf.to_container(node)) gives a dict
            self.image_tokenizer = ImageTokenizerConfig(**self.image_tokenizer)

    def validate(self) -> VLDataConfig:
        """Check the values a build needs; raise ConfigError naming the key to fix; return self."""
        if self.source not in SOURCES:
            raise ConfigError("data.source", f"unknown source {self.source!r}.", f"use one of {SOURCES}.")
        if self.source != "scenes" and not self.path:
            raise ConfigError(
                "data.path", f"source {self.source!r} needs a path.", "set data.path to a directory or dataset."
            )
        if self.source == "imagefolder" and not Path(self.path).expanduser().is_dir():
            raise ConfigError("data.path", f"{self.path} is not a directory.", "point it at an image folder.")
        for key, value in (("val_fraction", self.val_fraction), ("test_fraction", self.test_fraction)):
            if not 0.0 < value < 1.0:
                raise ConfigError(f"data.{key}", f"must lie strictly between 0 and 1, got {value}.")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("data.val_fraction", "val_fraction + test_fraction leaves no training data.")
        for key in ("num_scenes", "batch_size", "min_objects", "qa_per_scene"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}", f"must be positive, got {getattr(self, key)}.")
        if self.num_distractors < 0:
            raise ConfigError("data.num_distractors", f"must be >= 0, got {self.num_distractors}.")
        if self.grid < 2:
            raise ConfigError("data.grid", f"must be at least 2 (relations need two cells), got {self.grid}.")
        if self.image_size < 8 * self.grid:
            raise ConfigError(
                "data.image_size", f"{self.image_size} px leaves under 8 px per cell of a {self.grid}-grid."
            )
        if self.vocab_size < 16:
            raise ConfigError(
                "data.vocab_size", f"a text vocabulary of {self.vocab_size} is too small.", "e.g. data.vocab_size=1000."
            )
        if self.max_text_len < 2:
            raise ConfigError(
                "data.max_text_len", f"must hold [CLS] and a token, got {self.max_text_len}.", "e.g. 32."
            )
        self.image_tokenizer.validate()
        patch = self.image_tokenizer.patch_size
        if self.image_size % patch:
            raise ConfigError(
                "data.image_size",
                f"{self.image_size} px do not divide into patches of {patch} px.",
                f"use a multiple of data.image_tokenizer.patch_size, e.g. data.image_size="
                f"{max(patch, self.image_size // patch * patch)}, or change the patch size.",
            )
        if self.min_objects < 2:
            raise ConfigError("data.min_objects", f"a caption relates objects: need >= 2, got {self.min_objects}.")
        if not self.min_objects <= self.max_objects <= min(self.grid**2, 9):
            raise ConfigError(
                "data.max_objects",
                f"must lie in [data.min_objects, min(grid^2, 9)] = [{self.min_objects}, "
                f"{min(self.grid**2, 9)}], got {self.max_objects}.",
            )
        return self


def vl_cache_root(cfg: VLDataConfig) -> Path:
    """The cache directory, resolved like the text pipeline's (`data.cache_dir` or $DISTILL_CACHE)."""
    return cache_root(DataConfig(cache_dir=cfg.cache_dir))
