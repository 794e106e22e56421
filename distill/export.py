"""Exported model directories: safetensors weights + the model config (+ tokenizer), loadable by path alone.

Layout of an export directory::

    model.safetensors   weights (tied embeddings stored once)
    config.json         {"model": <ModelConfig as a dict>, "meta": {...}}
    tokenizer.json      the tokenizer the model was trained with (when known)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from distill.errors import ConfigError
from distill.models import GPT, ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return asdict(cfg)


def export_model(
    model: torch.nn.Module,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``out_dir`` atomically (a temporary sibling directory, then a rename)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_model(model, str(tmp / WEIGHTS))
        payload = {"model": model_config_to_dict(cfg), "meta": meta or {}}
        (tmp / CONFIG).write_text(json.dumps(payload, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_export_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / WEIGHTS).is_file() and (p / CONFIG).is_file()


def load_exported(path: str | os.PathLike, key: str = "teacher.path") -> tuple[torch.nn.Module, ModelConfig]:
    """Load a model from an export directory. ``key`` names the config key that gave ``path`` (for errors)."""
    p = Path(path).expanduser()
    if not is_export_dir(p):
        raise ConfigError(
            key,
            f"'{p}' is not an exported model directory (expected {WEIGHTS} and {CONFIG} inside).",
            "point it at the `export/` directory written by `python -m distill.pretrain`.",
        )
    payload = json.loads((p / CONFIG).read_text())
    cfg = ModelConfig.from_dict(payload["model"]).validate()  # a file's config: checked as it is read
    model = GPT(cfg)
    load_model(model, str(p / WEIGHTS))
    return model, cfg


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
