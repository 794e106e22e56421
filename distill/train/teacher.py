"""The frozen teacher of a KD module, loaded lazily, kept outside the module tree, released at the stop step
(`DistillModule`, and `distill.vl.module.VLModule`); `LMTeacher`, its outputs for language-model KD."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from distill.kd.fused import TeacherHidden
from distill.losses import is_dtensor
from distill.models import GPT


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


class LMTeacher(LazyTeacher):
    """`LazyTeacher` for a language-model KD module (`DistillModule`): the teacher's outputs for a batch, the
    logits trimmed to the student's vocabulary, or in training only its final hidden states (the fused head and
    loss, distill/kd/fused.py, applies its head chunk by chunk). The module sets ``model_cfg`` and
    ``teacher_calls``.

    The teacher runs frozen under inference mode; in training (the module in train mode) under bf16 autocast
    on a CUDA device that supports bf16. On CPU it stays in its own dtype: CPU bf16 matmuls are often slower
    than fp32 ones. Validation's teacher logits are never autocast, so the validation metrics stay exact."""

    model_cfg: Any
    teacher_calls: int

    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.teacher_outputs(inputs).logits

    def teacher_hidden_only(self, teacher: torch.nn.Module) -> bool:
        """Whether `teacher` can give its final hidden states without its logits: our GPT with a plain head.
        A Hugging Face model, or a teacher laid out on a mesh (DTensor parameters: FSDP, tensor parallelism),
        gives its full logits instead."""
        head = getattr(teacher, "lm_head", None)
        return (isinstance(teacher, GPT) and isinstance(head, torch.nn.Linear) and head.bias is None
                and not is_dtensor(head.weight))

    def teacher_autocast(self, device: torch.device) -> bool:
        """bf16 autocast for the teacher: in training, on a CUDA device with bf16."""
        return bool(self.training and device.type == "cuda" and torch.cuda.is_bf16_supported())

    def teacher_outputs(self, inputs: torch.Tensor, router: bool = False, hidden: bool = False,
                        logits: bool = True) -> Any:
        """The teacher's ModelOutput (logits trimmed to the student's vocabulary; only the logits, as a namespace,
        when nothing else is asked); router logits and hidden states only when asked, copied out of inference
        mode so that losses can save them for the backward. With ``logits=False`` a teacher with a hidden-only
        path (`teacher_hidden_only`) gives ``logits=None`` and ``final_hidden`` (its head's input; `kd_teacher`
        pairs it with the head weight); any other teacher gives its logits as usual."""
        teacher = self.ensure_teacher()
        self.teacher_calls += 1
        flags = {k: True for k, on in (("return_router_logits", router), ("return_hidden", hidden)) if on}
        head_only = not logits and self.teacher_hidden_only(teacher)
        autocast = (torch.autocast(inputs.device.type, dtype=torch.bfloat16) if self.teacher_autocast(inputs.device)
                    else contextlib.nullcontext())  # else as the caller runs (a precision plugin's autocast stays)
        with torch.inference_mode(), autocast:
            # a teacher on a mesh steps out of inference mode for its own all-gathers
            out = teacher(inputs, **flags, return_logits=False) if head_only else teacher(inputs, **flags)
        if not head_only:
            trimmed = out.logits[..., :self.model_cfg.vocab_size]  # padding-only entries trimmed
            if not flags:  # any teacher (a Hugging Face one returns its own output class): the logits are enough
                return SimpleNamespace(logits=trimmed)
            out = out._replace(logits=trimmed)
        if router:
            out = out._replace(moe_stats=[s._replace(router_logits=s.router_logits.clone()) for s in out.moe_stats])
        return out._replace(hidden_states=[h.clone() for h in out.hidden_states]) if hidden else out

    def kd_teacher(self, t_out: Any) -> TeacherHidden | torch.Tensor:
        """The teacher side of the fused loss for `teacher_outputs`' result: its logits when it gave them, else
        its final hidden states with its head weight's rows of the student's vocabulary (bf16 matmuls when the
        teacher ran under autocast)."""
        if t_out.logits is not None:
            return t_out.logits
        h = t_out.final_hidden
        weight = self.teacher.lm_head.weight[:self.model_cfg.vocab_size]
        return TeacherHidden(h, weight, torch.bfloat16 if self.teacher_autocast(h.device) else None)
