"""The frozen teacher of a KD module, loaded lazily, kept outside the module tree, released at the stop step
(`DistillModule`, and `distill.vl.module.VLModule`)."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch


class _TeacherSlot:
    """Holds the teacher outside the module tree: never in ``state_dict``, ``parameters()`` or the optimizer."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None


class LazyTeacher:
    """The frozen teacher of a KD module: built by ``self.teacher_loader`` at the first step that needs it,
    kept in ``self._slot`` (outside ``state_dict``, ``parameters()`` and the optimizer), released at the stop
    step and never run again. The module sets ``_slot``, ``teacher_loader`` and ``teacher_released``."""

    _slot: _TeacherSlot
    teacher_loader: Callable[[], torch.nn.Module] | None
    teacher_released: bool

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self._slot.model

    def ensure_teacher(self) -> torch.nn.Module:
        if self._slot.model is None:
            if self.teacher_released:
                raise RuntimeError("the teacher was released at the KD stop step and must not run again")
            if self.teacher_loader is None:
                raise RuntimeError("KD needs the teacher, but this module was built without a teacher_loader")
            # building the model draws from the RNG: keep the training stream as it would be without it
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                model = self.teacher_loader()
            model.eval().requires_grad_(False)
            self._slot.model = model.to(self.device)
        return self._slot.model

    def release_teacher(self) -> None:
        if self._slot.model is not None:
            self._slot.model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.teacher_released = True
