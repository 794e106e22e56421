"""Exported model directories: safetensors weights + the model config (+ tokenizer), loadable by path alone.

`export_model` streams the weights (one whole tensor in memory at a time) and takes a model laid out by
`distill.parallel.parallelize` as well as an ordinary one: then every rank calls it, each DTensor is
gathered in turn, and only the writer rank writes.

Layout of an export directory::

    model.safetensors   weights (tied embeddings stored once)
    config.json         {"model": <ModelConfig as a dict>, "meta": {...}, "fused_layout": "grouped"}
    tokenizer.json      the tokenizer the model was trained with (when known)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model

from distill.atomic import AtomicDir
from distill.errors import ConfigError
from distill.models import GPT, ModelConfig
from distill.models.fused import FUSED_LAYOUT
from distill.safetensors_stream import Entry, is_writer_rank, save_order, write_gathered

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return asdict(cfg)


def _storage_key(t: torch.Tensor) -> object:
    """Tensors sharing a key are one tensor saved under several names. A DTensor (or an empty tensor) is
    keyed by the object itself: the same on every rank, whatever its local shard holds."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor) or t.numel() == 0 or t.device.type == "meta":
        return id(t)
    return (t.device, t.untyped_storage().data_ptr())


def state_entries(model: torch.nn.Module) -> tuple[list[Entry], dict[str, str], dict[str, torch.Tensor]]:
    """(entries in file order, {dropped alias: kept name}, {name: tensor, DTensors as they are}) of what
    `save_model` would store: shared tensors (a tied head) once, under the first of their sorted names."""
    state = model.state_dict(keep_vars=True)  # the parameters themselves: a tie is one object on every rank
    groups: dict[object, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(_storage_key(t), []).append(name)
    aliases: dict[str, str] = {}
    for names in groups.values():
        keep, *drop = sorted(names)
        for name in drop:
            a, b = state[keep], state[name]
            if a is not b and (a.shape, a.stride(), a.data_ptr()) != (b.shape, b.stride(), b.data_ptr()):
                raise ValueError(f"{keep} and {name} share memory but are different tensors: cannot save")
            aliases[name] = keep
    entries = save_order((n, tuple(t.shape), t.dtype) for n, t in state.items() if n not in aliases)
    return entries, aliases, {n: state[n] for n, _, _ in entries}


def _one(name: str):
    return lambda t: [(name, t)]


def write_weights(model: torch.nn.Module, path: str | os.PathLike, writer: bool | None = None) -> None:
    """`model`'s weights as one safetensors file, the same bytes as `safetensors.torch.save_model` writes,
    streamed: one whole tensor in memory at a time. DTensors are gathered (every rank calls this); only
    `writer` (default: rank 0, or the only process) writes."""
    entries, aliases, tensors = state_entries(model)
    write = is_writer_rank() if writer is None else writer
    sources = ((tensors[name], _one(name)) for name, _, _ in entries)
    write_gathered(path, entries, sources, metadata=aliases or None, write=write)


def export_model(
    model: torch.nn.Module,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    meta: dict[str, Any] | None = None,
    *,
    writer: bool | None = None,
) -> Path:
    """Write ``model`` to ``out_dir`` atomically (a temporary sibling directory, then a rename).

    A model laid out by `distill.parallel.parallelize` (DTensor parameters): EVERY rank calls this, in
    the same order as its other collectives; the weights are gathered one tensor at a time and only the
    writer writes. ``writer``: whether this process writes (default: rank 0 when torch.distributed is
    initialised, else True). Other ranks return ``out_dir`` without waiting for the writer to finish.
    """
    out = Path(out_dir)
    write = is_writer_rank() if writer is None else writer
    if not write:
        write_weights(model, os.devnull, writer=False)  # the collectives only
        return out
    try:
        staging = AtomicDir(out)
    except Exception:
        write_weights(model, os.devnull, writer=False)  # the other ranks still wait in the gathers
        raise
    with staging as tmp:
        write_weights(model, tmp / WEIGHTS, writer=True)
        payload = {"model": model_config_to_dict(cfg), "meta": meta or {}, "fused_layout": FUSED_LAYOUT}
        (tmp / CONFIG).write_text(json.dumps(payload, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save(str(tmp))
    return out


def is_export_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / WEIGHTS).is_file() and (p / CONFIG).is_file()


def read_export_config(path: str | os.PathLike, key: str = "teacher.path") -> ModelConfig:
    """The checked model config of an export directory (ConfigError naming ``key`` if it is not one)."""
    p = Path(path).expanduser()
    if not is_export_dir(p):
        raise ConfigError(
            key,
            f"'{p}' is not an exported model directory (expected {WEIGHTS} and {CONFIG} inside).",
            "point it at the `export/` directory written by `python -m distill.pretrain`.",
        )
    payload = json.loads((p / CONFIG).read_text())
    return ModelConfig.from_dict(payload["model"]).validate()  # a file's config: checked as it is read


def load_exported(path: str | os.PathLike, key: str = "teacher.path") -> tuple[torch.nn.Module, ModelConfig]:
    """Load a model from an export directory. ``key`` names the config key that gave ``path`` (for errors)."""
    p = Path(path).expanduser()
    cfg = read_export_config(p, key)
    model = GPT(cfg)
    load_model(model, str(p / WEIGHTS))
    return model, cfg


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
