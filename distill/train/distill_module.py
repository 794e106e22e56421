"""`DistillModule`: staged knowledge distillation of a Mixture-of-Students.

``ce_weight * CE + w(step) * (KD + router_weight * router_KD + hidden_weight * hidden_KD) + aux`` while KD is
on, ``CE + aux`` after the stop step (the internal terms, distill/kd/internal.py, only when their weight is > 0).
In training CE and KD come from the fused, chunked LM head (distill/kd/fused.py; the teacher gives only its final
hidden states, or its logits when it has no such path) unless `optim.fused_head` is off or the student's head is a
DTensor; validation builds the full logits of both models (exact metrics). The schedule
(`distill.kd.KDSchedule`, built once by distill/resolve.py) is the one representation of when KD runs:
a schedule whose stop step is 0 never runs it, and then no teacher is given at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchmetrics.aggregation import MeanMetric

from distill.config import OptimConfig
from distill.errors import ConfigError
from distill.kd import KDConfig, KDSchedule, kd_loss_from_config, kl_to_teacher, top1_agreement
from distill.kd.fused import fused_head_from_config
from distill.kd.internal import hidden_kd_loss, resolve_internal_maps, router_kd_from_routes, router_kd_loss
from distill.kd.targets import lm_sparse_kd_from_config, routes_from_batch, targets_from_batch
from distill.losses import lm_loss
from distill.models import ModelConfig
from distill.train.lm_module import LMModule, loss_mask, split_batch
from distill.train.optim import lightning_optimizers
from distill.train.teacher import LMTeacher, _TeacherSlot


class DistillModule(LMTeacher, LMModule):
    """Staged KD from a teacher that is loaded lazily, frozen, and released at the stop step.

    ``teacher_loader`` is called at the first step that needs the teacher (so a run resumed after the stop
    step never loads it); the teacher is kept frozen in eval mode and run under inference mode, and
    released (memory freed) at the stop step; from then on it is never run again. ``teacher`` is the
    ``{path, sha256}`` the checkpoints record. `load_from_checkpoint` passes the checkpoint's plain
    hyper-parameters (``schedule`` as ``{kd, max_steps}``) and no loader: such a module evaluates and exports,
    and says so if it is asked to run the teacher.

    Internal KD (``kd.router_weight`` / ``kd.hidden_weight`` > 0) needs the teacher's architecture
    (``teacher_cfg``; by default that of ``teacher_loader.source``): the layer maps are checked against it
    and, when the widths differ, ``hidden_proj`` (student -> teacher width, trained with the student, in the
    checkpoint but not in ``model``, so not exported) is built. ``expert_maps`` ({student MoE-layer index:
    the teacher expert each student expert started from}; None or a missing layer: the first N) and
    ``teacher_layers`` (student block -> teacher block for hidden KD; None: `default_block_map`) are set by
    whoever initialises the student and saved in the checkpoints.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        optim: OptimConfig,
        schedule: KDSchedule,
        teacher_loader: Callable[[], torch.nn.Module] | None = None,
        teacher: dict[str, str] | None = None,
        teacher_cfg: ModelConfig | Mapping | None = None,
    ):
        if isinstance(schedule, Mapping):  # from a checkpoint's hyper-parameters
            schedule = KDSchedule(KDConfig(**schedule["kd"]), schedule["max_steps"])
        teacher_cfg = _teacher_architecture(schedule, teacher_loader, teacher_cfg)
        extra = {"teacher_cfg": dataclasses.asdict(teacher_cfg)} if teacher_cfg is not None else {}
        super().__init__(model_cfg, optim, schedule.max_steps, teacher=teacher,
                         schedule={"kd": dataclasses.asdict(schedule.cfg), "max_steps": schedule.max_steps}, **extra)
        self.schedule = schedule
        self.offline = schedule.cfg.teacher_targets == "offline"  # train batches carry the teacher's top-k
        self.teacher_loader = teacher_loader if schedule.uses_teacher else None
        self.teacher_info = teacher
        self._slot = _TeacherSlot()
        self.teacher_calls = 0
        self.teacher_released = False
        self.val_kl = MeanMetric()
        self.val_agree = MeanMetric()
        self.teacher_cfg = teacher_cfg
        self.expert_maps: dict[int, list[int]] | None = None  # see the class docstring
        self.teacher_layers: list[int] | None = None
        self._maps: tuple[str, list[int], list[torch.Tensor | None], list[int]] | None = None
        self.hidden_proj: torch.nn.Linear | None = None
        k = schedule.cfg
        if teacher_cfg is not None:
            resolve_internal_maps(k, teacher_cfg, self.model_cfg)  # kd.layer_map against the teacher
            if k.hidden_weight > 0 and teacher_cfg.d_model != self.model_cfg.d_model:
                self.hidden_proj = torch.nn.Linear(self.model_cfg.d_model, teacher_cfg.d_model, bias=False)

    # ----------------------------------------------------------------------------- the teacher
    def kd_active(self, step: int | None = None) -> bool:
        return self.schedule.active(self.global_step if step is None else step)

    # ----------------------------------------------------------------------------- internal KD
    def _resolved_maps(self) -> tuple[list[int], list[torch.Tensor | None], list[int]]:
        """`resolve_internal_maps` for the teacher architecture (``teacher_cfg``, else the loaded teacher's),
        the expert maps as tensors here; computed again when `expert_maps` or `teacher_layers` change."""
        key = repr((self.expert_maps, self.teacher_layers))
        if self._maps is None or self._maps[0] != key:
            k, tcfg = self.schedule.cfg, self.teacher_cfg if self.teacher_cfg is not None else self.teacher.cfg
            if k.hidden_weight > 0 and tcfg.d_model != self.model_cfg.d_model and self.hidden_proj is None:
                raise ConfigError("kd.hidden_weight", f"the teacher's width {tcfg.d_model} differs from the "
                                  f"student's {self.model_cfg.d_model}, and the module was built without the "
                                  "teacher's architecture, so it has no projection.",
                                  "build DistillModule with teacher_cfg (or a loader with a teacher source).")
            m = resolve_internal_maps(k, tcfg, self.model_cfg, self.expert_maps, self.teacher_layers)
            maps = [None if e is None else torch.tensor(e, device=self.device) for e in m.expert_maps]
            self._maps = (key, m.layer_map, maps, m.block_map)
        return self._maps[1:]

    def internal_terms(self, out: Any, t_out: Any, mask: torch.Tensor | None,
                       routes: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``router_kd`` (mean over the mapped MoE layers) and ``hidden_kd`` (mean over the student's
        blocks), each only when its weight is > 0; `out` and `t_out` are the student's and teacher's outputs.
        Offline (no `t_out`), router KD reads the teacher's stored `routes` (ids, log-probabilities
        [B, M, L, r], distill/kd/targets.py)."""
        k = self.schedule.cfg
        if k.router_weight <= 0 and k.hidden_weight <= 0:
            return {}
        layer_map, maps, blocks = self._resolved_maps()
        terms = {}
        if k.router_weight > 0 and t_out is None:
            assert routes is not None
            r_ids, r_logp = routes
            r = r_ids.shape[-1]
            losses = [router_kd_from_routes(s.router_logits, r_ids[:, ti].reshape(-1, r), r_logp[:, ti].reshape(-1, r),
                                            mask, m) for s, ti, m in zip(out.moe_stats, layer_map, maps)]
            terms["router_kd"] = torch.stack(losses).mean() if losses else out.aux_loss.new_zeros(())
        elif k.router_weight > 0:
            t_stats = t_out.moe_stats
            losses = [router_kd_loss(s.router_logits, t_stats[ti].router_logits, mask, m)
                      for s, ti, m in zip(out.moe_stats, layer_map, maps)]
            terms["router_kd"] = torch.stack(losses).mean() if losses else out.aux_loss.new_zeros(())
        if k.hidden_weight > 0:
            losses = [hidden_kd_loss(h, t_out.hidden_states[ti], mask, k.hidden_loss, self.hidden_proj)
                      for h, ti in zip(out.hidden_states, blocks)]
            terms["hidden_kd"] = torch.stack(losses).mean()
        return terms

    def configure_optimizers(self) -> dict[str, Any]:
        """The student's optimizer; with a hidden-state projection, that is trained too."""
        if self.hidden_proj is None:
            return super().configure_optimizers()
        return lightning_optimizers(self, torch.nn.ModuleList([self.model, self.hidden_proj]), self.optim,
                                    self.max_steps)

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step = self.global_step
        active = self.kd_active(step)
        if not active and self.teacher_loader is not None and not self.teacher_released:
            self.release_teacher()
        k = self.schedule.cfg
        router, hidden = active and k.router_weight > 0, active and k.hidden_weight > 0
        offline = active and self.offline  # the teacher's stored top-k (distill/kd/targets.py); it never runs
        inputs, targets = split_batch(batch)
        mask = loss_mask(batch)
        weight = self.schedule.weight(step) if active else 0.0
        t_out = None
        if active and not offline:  # with the fused head: only the teacher's final hidden states, where it can
            t_out = self.teacher_outputs(inputs, router=router, hidden=hidden, logits=not self.fused_head())
        log_teacher = t_out is not None and self.is_logging_step()
        teacher_ce: list[torch.Tensor] = []  # the fused pass's teacher CE, on logging steps

        def logit_terms(logits: torch.Tensor, tgt: torch.Tensor, m: torch.Tensor | None) -> dict[str, torch.Tensor]:
            terms = (lm_sparse_kd_from_config(logits, tgt, targets_from_batch(batch), m, k) if offline else
                     {"ce": lm_loss(logits, tgt, m), "kd": kd_loss_from_config(logits, t_out.logits, m, k)})
            return {**terms, "head": k.ce_weight * terms["ce"] + weight * terms["kd"]}

        def hidden_terms(h: torch.Tensor, w: torch.Tensor, tgt: torch.Tensor,
                         m: torch.Tensor | None) -> dict[str, torch.Tensor]:
            side = targets_from_batch(batch) if offline else self.kd_teacher(t_out)
            fused = fused_head_from_config(h, w, tgt, m, k, side, ce_weight=k.ce_weight, kd_weight=weight,
                                           teacher_ce=log_teacher)
            teacher_ce.extend([] if fused.teacher_ce is None else [fused.teacher_ce])
            return {"head": fused.loss, "ce": fused.ce, "kd": fused.kd}

        terms, out = self.lm_terms(batch, logit_terms if active else None, hidden_terms if active else None,
                                   return_router_logits=router, return_hidden=hidden)
        if active:
            internal = self.internal_terms(out, t_out, mask, routes_from_batch(batch) if router and offline else None)
            terms.update(internal)
            if internal:
                terms["loss"] = terms["loss"] + weight * sum(
                    getattr(k, n.replace("_kd", "_weight")) * v for n, v in internal.items())
            if log_teacher:  # a full log-softmax (the fused pass: one logsumexp per chunk): only when it is logged
                self.log("teacher/ce", teacher_ce[0] if teacher_ce else lm_loss(t_out.logits, targets, mask))
        else:
            # Lightning re-logs a key's last value on steps that do not log it: make "off" explicit
            terms["kd"] = terms["ce"].new_zeros(())
            for name in ("router_kd", "hidden_kd"):
                if getattr(k, name.replace("_kd", "_weight")) > 0:
                    terms[name] = terms["ce"].new_zeros(())
            if self.hidden_proj is not None:  # unused from now on: a zero term keeps DDP's reducer expecting it
                terms["loss"] = terms["loss"] + 0.0 * sum(p.sum() for p in self.hidden_proj.parameters())
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
        if self.kd_active() and not self.teacher_released and not self.offline:
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
        checkpoint["distill"] = {"teacher": self.teacher_info, "kd_stop_step": self.schedule.stop_step,
                                 "expert_maps": self.expert_maps, "teacher_layers": self.teacher_layers}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("distill") or {}
        if saved.get("expert_maps") is not None:
            self.expert_maps = {int(i): list(v) for i, v in saved["expert_maps"].items()}
        if saved.get("teacher_layers") is not None:
            self.teacher_layers = list(saved["teacher_layers"])
        stop = saved.get("kd_stop_step", self.schedule.stop_step)
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



def _teacher_architecture(schedule: KDSchedule, loader: Any, given: ModelConfig | Mapping | None) -> ModelConfig | None:
    """The teacher's ModelConfig for internal KD: `given` (a checkpoint's hyper-parameters give a mapping), else,
    when internal KD runs, that of the loader's teacher source (``loader.source.architecture()``), else None."""
    if isinstance(given, Mapping):
        return ModelConfig.from_dict(given)
    if given is not None:
        return given
    k = schedule.cfg
    if schedule.uses_teacher and (k.router_weight > 0 or k.hidden_weight > 0):
        architecture = getattr(getattr(loader, "source", None), "architecture", None)
        if callable(architecture):
            return architecture()
    return None
