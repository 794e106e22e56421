"""Any image-text dataset that `datasets` loads: an imagefolder directory or a dataset with an image column.

`data.source=imagefolder` reads `data.path` with `load_dataset("imagefolder", data_dir=...)` (captions
from a metadata.jsonl with a "file_name" column); `data.source=hub` calls `load_dataset(data.path,
data.name)`. Every split is pooled, checked (the columns exist, every image decodes), then re-split by a
salted hash of each image's bytes, so identical images never straddle two splits. Columns become
"image" and "caption".
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import datasets
from datasets import DatasetDict, Image, Value
from PIL import Image as PILImage

from distill.data.config import SPLITS, digest
from distill.data.corpus import split_of
from distill.data.vl_config import VLDataConfig, vl_cache_root
from distill.errors import ConfigError

logger = logging.getLogger(__name__)


def load_image_text(cfg: VLDataConfig) -> DatasetDict:
    """The image-text dataset of `cfg` as splits train/validation/test with columns "image", "caption"."""
    if cfg.source == "imagefolder":
        root = Path(cfg.path).expanduser()
        if not root.is_dir():
            raise ConfigError("data.path", f"{root} is not a directory.", "point it at an image folder.")
        args: tuple[Any, ...] = ("imagefolder",)
        kwargs: dict[str, Any] = {"data_dir": str(root)}
    else:
        args, kwargs = (cfg.path, cfg.name), {}
    try:
        loaded = datasets.load_dataset(
            *args, split=cfg.split, cache_dir=str(vl_cache_root(cfg) / "datasets"), **kwargs
        )
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise ConfigError("data.path", f"datasets.load_dataset({cfg.path!r}) failed: {err}") from err
    if isinstance(loaded, DatasetDict):  # no `split` given: pool every split the dataset has
        loaded = datasets.concatenate_datasets(list(loaded.values()))
    found = loaded.column_names
    for key, column in (("image_column", cfg.image_column), ("text_column", cfg.text_column)):
        if column not in found:
            hint = " (imagefolder reads captions from a metadata.jsonl next to the images)"
            raise ConfigError(
                f"data.{key}",
                f"the dataset has no column {column!r}; its columns are {found}"
                f"{hint if cfg.source == 'imagefolder' else ''}.",
                f"set data.{key} to one of them.",
            )
    if not isinstance(loaded.features[cfg.image_column], Image):
        raise ConfigError(
            "data.image_column", f"column {cfg.image_column!r} holds {loaded.features[cfg.image_column]}, not images."
        )
    feature = loaded.features[cfg.text_column]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise ConfigError("data.text_column", f"column {cfg.text_column!r} holds {feature}, not text.")
    pairs = loaded.select_columns([cfg.image_column, cfg.text_column])
    pairs = pairs.rename_columns({cfg.image_column: "image", cfg.text_column: "caption"})
    raw = pairs.cast_column("image", Image(decode=False))
    keyed = raw.map(
        _image_keys,
        batched=True,
        input_columns="image",
        new_fingerprint=digest("vl-keys", raw._fingerprint),
        desc="Checking images",
    )
    hashing = {"seed": cfg.split_seed, "val": cfg.val_fraction, "test": cfg.test_fraction}
    splits = {}
    for split in SPLITS:
        chosen = keyed.filter(
            _in_split,
            batched=True,
            input_columns="key",
            fn_kwargs={"split": split, **hashing},
            new_fingerprint=digest("vl-split", keyed._fingerprint, split, hashing),
            desc=f"Selecting {split} images",
        )
        splits[split] = chosen.remove_columns("key").cast_column("image", Image())
        if len(splits[split]) == 0:
            key = {"validation": "data.val_fraction", "test": "data.test_fraction"}.get(split, "data.path")
            raise ConfigError(key, f"the {split} split has no images ({len(keyed)} in all).")
    logger.info("vl data (%s): %s", cfg.source, {s: len(d) for s, d in splits.items()})
    return DatasetDict(splits)


def _image_bytes(image: dict[str, Any]) -> tuple[bytes, str]:
    if image.get("bytes") is not None:
        return image["bytes"], image.get("path") or "<embedded image>"
    return Path(image["path"]).read_bytes(), image["path"]


def _image_keys(images: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Check that each image decodes (ConfigError naming the file if not); key it by its bytes' hash."""
    keys = []
    for image in images:
        data, name = _image_bytes(image)
        try:
            with PILImage.open(io.BytesIO(data)) as img:
                img.verify()
        except Exception as err:  # Pillow raises many types for bytes that are not an image
            raise ConfigError("data.path", f"{name} is not a readable image ({type(err).__name__}).") from err
        keys.append(hashlib.blake2b(data, digest_size=16).hexdigest())
    return {"key": keys}


def _in_split(keys: list[str], split: str, seed: int, val: float, test: float) -> list[bool]:
    return [split_of(k, seed, val, test) == split for k in keys]
