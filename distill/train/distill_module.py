"""`DistillModule`: staged knowledge distillation of a Mixture-of-Students.

``ce_weight * CE + w(step) * KD + aux`` while KD is on, ``CE + aux`` after the stop step. The schedule
(`distill.kd.KDSchedule`, built once by distill/resolve.py) is the one representation of when KD runs:
a schedule whose stop step is 0 never runs it, and then no teacher is given at all.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchmetrics.aggregation import MeanMetric

from distill.config import OptimConfig
from distill.errors import ConfigError
from distill.kd import KDConfig, KDSchedule, kd_loss_from_config, kl_to_teacher, top1_agreement
from distill.losses import lm_loss
from distill.models import ModelConfig
from distill.train.lm_module import LMModule, loss_mask, split_batch


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


class DistillModule(LazyTeacher, LMModule):
    """Staged KD from a teacher that is loaded lazily, frozen, and released at the stop step.

    ``teacher_loader`` is called at the first step that needs the teacher (so a run resumed after the stop
    step never loads it); the teacher is kept frozen in eval mode and run under inference mode, and
    released (memory freed) at the stop step; from then on it is never run again. ``teacher`` is the
    ``{path, sha256}`` the checkpoints record. `load_from_checkpoint` passes the checkpoint's plain
    hyper-parameters (``schedule`` as ``{kd, max_steps}``) and no loader: such a module evaluates and exports,
    and says so if it is asked to run the teacher.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        optim: OptimConfig,
        schedule: KDSchedule,
        teacher_loader: Callable[[], torch.nn.Module] | None = None,
        teacher: dict[str, str] | None = None,
    ):
        if isinstance(schedule, Mapping):  # from a checkpoint's hyper-parameters
            schedule = KDSchedule(KDConfig(**schedule["kd"]), schedule["max_steps"])
        super().__init__(model_cfg, optim, schedule.max_steps, teacher=teacher,
                         schedule={"kd": dataclasses.asdict(schedule.cfg), "max_steps": schedule.max_steps})
        self.schedule = schedule
        self.teacher_loader = teacher_loader if schedule.uses_teacher else None
        self.teacher_info = teacher
        self._slot = _TeacherSlot()
        self.teacher_calls = 0
        self.teacher_released = False
        self.val_kl = MeanMetric()
        self.val_agree = MeanMetric()

    # ----------------------------------------------------------------------------- the teacher
    def kd_active(self, step: int | None = None) -> bool:
        return self.schedule.active(self.global_step if step is None else step)

    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        teacher = self.ensure_teacher()
        self.teacher_calls += 1
        with torch.inference_mode():  # a teacher on a mesh steps out of it for its own all-gathers
            logits = teacher(inputs).logits
        vocab = self.model_cfg.vocab_size
        return logits[..., :vocab] if logits.shape[-1] > vocab else logits  # padding-only entries trimmed

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step = self.global_step
        active = self.kd_active(step)
        if not active and self.teacher_loader is not None and not self.teacher_released:
            self.release_teacher()
        terms, out = self.lm_terms(batch)
        if active:
            inputs, targets = split_batch(batch)
            t_logits = self.teacher_logits(inputs)
            k = self.schedule.cfg
            kd = kd_loss_from_config(out.logits, t_logits, loss_mask(batch), k)
            weight = self.schedule.weight(step)
            terms["loss"] = (k.ce_weight * terms["ce"] + weight * kd + self.optim.aux_coef * terms["aux"]
                             + self.optim.z_coef * terms["z"])
            terms["kd"] = kd
            if self.is_logging_step():  # a full log-softmax over the vocabulary: only when it is logged
                self.log("teacher/ce", lm_loss(t_logits, targets, loss_mask(batch)))
        else:
            # Lightning re-logs a key's last value on steps that do not log it: make "off" explicit
            terms["kd"], weight = terms["ce"].new_zeros(()), 0.0
            self.log("teacher/ce", float("nan"))
        self.log("kd/weight", weight)
        self.log("kd/active", float(active))
        self.finish_step(terms, out)
        return terms["loss"]

    def stage_figures(self) -> dict[str, Any]:
        return {"kd_stop_step": self.schedule.stop_step, "teacher_calls": self.teacher_calls}

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = split_batch(batch)
        out = self.model(inputs)
        self.val_loss.update(lm_loss(out.logits, targets), weight=targets.numel())
        if self.kd_active() and not self.teacher_released:
            t_logits = self.teacher_logits(inputs)
            mask = loss_mask(batch)
            kl = kl_to_teacher(out.logits, t_logits, mask, chunk_size=self.schedule.cfg.chunk_size)
            self.val_kl.update(kl, weight=targets.numel())
            self.val_agree.update(top1_agreement(out.logits, t_logits, mask), weight=targets.numel())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.val_kl.update_called:
            self.log("val/kl_teacher", self.val_kl.compute())
            self.log("val/top1_agree", self.val_agree.compute())
        self.val_kl.reset()
        self.val_agree.reset()

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["distill"] = {"teacher": self.teacher_info, "kd_stop_step": self.schedule.stop_step}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stop = (checkpoint.get("distill") or {}).get("kd_stop_step", self.schedule.stop_step)
        if stop != self.schedule.stop_step:
            from lightning.pytorch.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(f"the checkpoint was trained with KD stop step {stop}, this run stops KD at "
                           f"{self.schedule.stop_step}: the resumed losses will differ from the original run's.")
        recorded = (checkpoint.get("distill") or {}).get("teacher")
        mine = self.teacher_info
        if recorded and mine and recorded.get("sha256") != mine.get("sha256"):
            raise ConfigError(
                "teacher.path",
                f"this checkpoint was distilled from teacher {recorded.get('path')} "
                f"(sha256 {str(recorded.get('sha256'))[:12]}), but the run is configured with "
                f"{mine.get('path')} (sha256 {str(mine.get('sha256'))[:12]}).",
                "resume with the original teacher, or start a new run directory.",
            )

