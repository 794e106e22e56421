"""Teachers trained by this project: an export directory (``teacher=native``) or a Lightning checkpoint of
`LMModule` (``teacher=checkpoint``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from distill.errors import ConfigError
from distill.export import CONFIG, TOKENIZER, WEIGHTS, file_sha256
from distill.models import GPT, ModelConfig
from distill.models.fused import FUSED_LAYOUT, fused_tensors
from distill.parallel.load import Interleaved, LazyTensor, Loaded, Narrow, SafetensorsFiles, full_index
from teachers.base import (
    KEY,
    TeacherRef,
    TeacherSource,
    check_state_shapes,
    safetensors_shapes,
    with_tied_names,
)

FIX = "point it at the `export/` directory written by `python -m distill.pretrain` (or an intact copy)."


def _model_config(entry: Any, where: str) -> ModelConfig:
    if not isinstance(entry, dict):
        raise ConfigError(KEY, f"{where} has no `model` entry (the teacher's architecture).", FIX)
    try:
        return ModelConfig.from_dict(entry)
    except ConfigError as err:
        raise ConfigError(KEY, f"{where}: the model config is invalid ({err.key}: {err.problem})", FIX) from None


class ExportTeacher(TeacherSource):
    """An export directory: ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``)."""

    def __init__(self, path: str | os.PathLike | None):
        super().__init__(path)
        self.dir = Path(path).expanduser()  # type: ignore[arg-type]
        if not ((self.dir / WEIGHTS).is_file() and (self.dir / CONFIG).is_file()):
            hint = " For a Lightning checkpoint use teacher=checkpoint." if self.dir.suffix == ".ckpt" else ""
            raise ConfigError(KEY, f"no teacher at '{self.dir}' (expected an export directory with {WEIGHTS} + "
                              f"{CONFIG}).{hint}", FIX)

    @cached_property
    def _payload(self) -> Any:
        file = self.dir / CONFIG
        try:
            return json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ConfigError(KEY, f"{file} is not valid JSON ({err}).", FIX) from None

    def read_architecture(self) -> ModelConfig:
        payload = self._payload
        return _model_config(payload.get("model") if isinstance(payload, dict) else None, str(self.dir / CONFIG))

    @property
    def legacy_layout(self) -> bool:
        """Exported before the grouped layout of the fused projections: they hold [q | k | v], [gate | up]."""
        payload = self._payload
        return not isinstance(payload, dict) or payload.get("fused_layout") != FUSED_LAYOUT

    @cached_property
    def _identity(self) -> TeacherRef:
        return TeacherRef(path=str(self.dir.resolve()), sha256=file_sha256(self.dir / WEIGHTS))

    def identity(self) -> TeacherRef:
        return self._identity

    def verify(self) -> None:
        file = self.dir / WEIGHTS
        check_state_shapes(safetensors_shapes(file), self.architecture(), str(file))

    def tokenizer_file(self) -> Path | None:
        return self.dir / TOKENIZER

    def load(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        from safetensors.torch import load_model

        model = GPT(self.architecture())
        if self.legacy_layout:  # fused projections converted on the way in
            model.load_state_dict(read_whole(self.sharded_tensors(), model))
        else:
            load_model(model, str(self.dir / WEIGHTS))
        return model.to(dtype).eval().requires_grad_(False)

    def sharded_tensors(self) -> Mapping[str, LazyTensor]:
        """The export's tensors, sliced from model.safetensors (headers and shapes checked first); the fused
        projections of an export written before their grouped layout are converted region by region."""
        file = self.dir / WEIGHTS
        files = SafetensorsFiles([file], KEY)
        cfg = self.architecture()
        check_state_shapes(files.shapes(), cfg, str(file))
        tensors: dict[str, LazyTensor] = {name: files.tensor(name) for name in files.keys()}
        if self.legacy_layout:
            tensors = grouped_layout(tensors, cfg)
        return with_tied_names(tensors, cfg)


class CheckpointTeacher(TeacherSource):
    """A Lightning checkpoint (``.ckpt``) of `LMModule`: the model config in its hyper-parameters."""

    def __init__(self, path: str | os.PathLike | None):
        super().__init__(path)
        self.file = Path(path).expanduser()  # type: ignore[arg-type]
        if not self.file.is_file():
            raise ConfigError(KEY, f"no checkpoint at '{self.file}'.",
                              "point it at a .ckpt written by python -m distill.pretrain (<run dir>/checkpoints).")

    @cached_property
    def _checkpoint(self) -> dict[str, Any]:
        """The checkpoint, memory-mapped (tensors are read when used)."""
        try:
            ckpt = torch.load(self.file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises many types for a damaged archive or pickle
            raise ConfigError(KEY, f"{self.file} cannot be read as a checkpoint ({str(err).splitlines()[0]}).",
                              "point it at an intact .ckpt (python -m distill.pretrain writes <run dir>/checkpoints).") from None
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise ConfigError(KEY, f"{self.file} holds no weights (no `state_dict`).", "point it at a training checkpoint.")
        return ckpt

    def read_architecture(self) -> ModelConfig:
        hparams = self._checkpoint.get("hyper_parameters") or {}
        return _model_config(hparams.get("model_cfg"), f"{self.file} (hyper_parameters.model_cfg)")

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k.removeprefix("model."): v for k, v in self._checkpoint["state_dict"].items() if k.startswith("model.")}

    @cached_property
    def _identity(self) -> TeacherRef:
        return TeacherRef(path=str(self.file.resolve()), sha256=file_sha256(self.file))

    def identity(self) -> TeacherRef:
        return self._identity

    def verify(self) -> None:
        found = {k: tuple(v.shape) for k, v in self._weights().items()}
        check_state_shapes(found, self.architecture(), str(self.file))

    @property
    def legacy_layout(self) -> bool:
        """Written before the grouped layout of the fused projections: they hold [q | k | v], [gate | up]."""
        return self._checkpoint.get("fused_layout") != FUSED_LAYOUT

    def load(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        model = GPT(self.architecture())
        if self.legacy_layout:  # fused projections converted on the way in
            model.load_state_dict(read_whole(self.sharded_tensors(), model))
        else:
            model.load_state_dict(self._weights())
        return model.to(dtype).eval().requires_grad_(False)

    def sharded_tensors(self) -> Mapping[str, LazyTensor]:
        """The checkpoint's tensors, memory-mapped: a rank slicing one touches only its region's pages (the
        pickled structure is read whole by every rank; a torch archive has no per-slice reader). The fused
        projections of a checkpoint written before their grouped layout are converted region by region."""
        weights = self._weights()
        cfg = self.architecture()
        check_state_shapes({k: tuple(v.shape) for k, v in weights.items()}, cfg, str(self.file))
        tensors: dict[str, LazyTensor] = {k: Loaded(v) for k, v in weights.items()}
        if self.legacy_layout:
            tensors = grouped_layout(tensors, cfg)
        return with_tied_names(tensors, cfg)


def grouped_layout(tensors: Mapping[str, LazyTensor], cfg: ModelConfig) -> dict[str, LazyTensor]:
    """Weights written before the grouped layout of the fused projections, converted (lazily, region by
    region): each fused tensor's parts, stored one after the other, interleaved by group."""
    out = dict(tensors)
    for name, (dim, parts, groups) in fused_tensors(cfg).items():
        starts = [sum(parts[:i]) for i in range(len(parts))]
        out[name] = Interleaved([Narrow(tensors[name], dim, a, n) for a, n in zip(starts, parts)], groups, dim)
    return out


def read_whole(tensors: Mapping[str, LazyTensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of `model`'s state dict, read whole from `tensors`."""
    return {k: tensors[k].read(full_index(v.shape)) for k, v in model.state_dict().items()}
