"""Teachers trained by this project: an export directory or a Lightning checkpoint of `LMModule`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distill.errors import ConfigError
from distill.export import WEIGHTS, file_sha256, is_export_dir, load_exported
from distill.models import GPT, ModelConfig, load_model_config


@dataclass(frozen=True)
class TeacherRef:
    """Which teacher: its path and the sha256 of its weights file (what a student checkpoint records)."""

    path: str
    sha256: str


def teacher_weights_file(path: str | Path, key: str = "teacher.path") -> Path:
    p = Path(path).expanduser()
    if is_export_dir(p):
        return p / WEIGHTS
    if p.is_file() and p.suffix == ".ckpt":
        return p
    raise ConfigError(
        key,
        f"no teacher at '{p}' (expected an export directory with {WEIGHTS} + config.json, or a .ckpt file).",
        "point it at the `export/` directory (or a checkpoint) written by `python -m distill.pretrain`.",
    )


def teacher_ref(path: str | Path, key: str = "teacher.path") -> TeacherRef:
    f = teacher_weights_file(path, key)
    return TeacherRef(path=str(Path(path).expanduser().resolve()), sha256=file_sha256(f))


def load_native_teacher(path: str | Path, key: str = "teacher.path") -> tuple[torch.nn.Module, ModelConfig]:
    """Load the teacher frozen: eval mode, no gradients."""
    f = teacher_weights_file(path, key)
    if f.suffix == ".ckpt":
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
        cfg = load_model_config(ckpt["hyper_parameters"]["model_cfg"])
        model = GPT(cfg)
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        model.load_state_dict(state)
    else:
        model, cfg = load_exported(f.parent, key)
    model.eval().requires_grad_(False)
    return model, cfg


def read_native_teacher_config(path: str | Path, key: str = "teacher.path") -> ModelConfig:
    """The teacher's architecture without loading its weights (an export dir's config.json)."""
    f = teacher_weights_file(path, key)
    if f.suffix == ".ckpt":
        return load_model_config(torch.load(f, map_location="meta", weights_only=True)["hyper_parameters"]["model_cfg"])
    import json

    from distill.export import CONFIG

    return load_model_config(json.loads((f.parent / CONFIG).read_text())["model"])
