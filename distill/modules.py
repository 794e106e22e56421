"""LightningModules: LM pretraining (teacher or student) and, in later sections, distillation.

The model knows nothing about training; this module owns the objective, the optimizer and the metrics.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torchmetrics.aggregation import MeanMetric

from distill.checkpointing import NonFiniteError
from distill.config import OptimConfig
from distill.kd import KDConfig, KDSchedule, kd_loss_from_config, kl_to_teacher, top1_agreement
from distill.models import GPT, ModelConfig, configure_optimizer_groups, lm_loss, load_model_config


def plain(value: Any) -> Any:
    """Dataclasses / OmegaConf nodes -> dicts and lists (recursively)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def loss_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Which target positions count (None: all; packed blocks have no padding)."""
    mask = batch.get("loss_mask")
    return None if mask is None else mask[:, 1:]


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed block of ``seq_len + 1`` tokens -> (inputs, next-token targets)."""
    ids = batch["input_ids"]
    return ids[:, :-1], ids[:, 1:]


class LMModule(L.LightningModule):
    """Next-token LM training: ``loss = CE + aux_coef * aux + z_coef * z``."""

    def __init__(self, model_cfg: ModelConfig, optim: OptimConfig, max_steps: int, **extra_hparams: Any):
        super().__init__()
        model_cfg = load_model_config(model_cfg)
        optim = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), optim))
        # plain containers only: checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(plain({"model_cfg": model_cfg, "optim": optim, "max_steps": max_steps,
                                         **extra_hparams}))
        self.model_cfg = model_cfg
        self.optim = optim
        self.max_steps = max_steps
        self.model = GPT(model_cfg)
        self.val_loss = MeanMetric()
        self._t_last: float | None = None
        self.tokens_seen = 0
        self.train_time_s = 0.0  # wall time of timed steps (the first step, with warm-up, excluded)
        self.train_tokens_timed = 0
        self.val_history: list[tuple[int, float]] = []  # (step, val loss) of each validation during fit
        self._nonfinite: dict[str, torch.Tensor] = {}  # loss term -> "was NaN/Inf" since the last optimizer step
        self._last_terms: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------- training
    def lm_terms(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """The LM objective's terms for one batch, and the model output (the distillation module reuses it)."""
        inputs, targets = split_batch(batch)
        out = self.model(inputs)
        ce = lm_loss(out.logits, targets, loss_mask(batch))
        loss = ce + self.optim.aux_coef * out.aux_loss + self.optim.z_coef * out.z_loss
        return {"loss": loss, "ce": ce, "aux": out.aux_loss, "z": out.z_loss}, out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms, out = self.lm_terms(batch)
        self.watch_terms(terms)
        self.log_terms("train", terms, out)
        return terms["loss"]

    def log_terms(self, prefix: str, terms: dict[str, torch.Tensor], out: Any) -> None:
        for name, value in terms.items():
            self.log(f"{prefix}/{name}", value.detach(), prog_bar=name == "loss")
        self.log(f"{prefix}/ppl", torch.exp(terms["ce"].detach()))
        if self.is_logging_step():
            self.log_moe_stats(out.moe_stats)

    def is_logging_step(self) -> bool:
        """Steps whose values reach the logger: metrics that cost compute are only computed on them."""
        return self.global_step % max(1, self.trainer.log_every_n_steps) == 0

    def log_moe_stats(self, stats: list) -> None:
        """Per-MoE-layer load imbalance (coefficient of variation of tokens per expert) and drop fraction."""
        for i, s in enumerate(stats):
            counts = s.tokens_per_expert.detach().float()
            cv = counts.std(unbiased=False) / counts.mean().clamp_min(1e-9)
            self.log(f"moe/layer{i}_load_cv", cv)
            self.log(f"moe/layer{i}_drop_frac", s.drop_fraction.detach().float())

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._t_last is None:
            self._t_last = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        now = time.perf_counter()
        n = batch["input_ids"][:, :-1].numel() * self.trainer.world_size
        self.tokens_seen += n
        if self._t_last is not None and self.global_step > 1:  # skip warm-up steps
            dt = now - self._t_last
            self.train_time_s += dt
            self.train_tokens_timed += n
            self.log("perf/tokens_per_s", n / max(dt, 1e-9))
        self._t_last = now
        self.log("perf/tokens_seen", float(self.tokens_seen))

    def on_validation_epoch_start(self) -> None:
        self._t_last = None  # validation time is not training time

    @property
    def train_tokens_per_s(self) -> float:
        return self.train_tokens_timed / self.train_time_s if self.train_time_s > 0 else float("nan")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.check_finite()
        for module in self.model.modules():
            update = getattr(module, "update_balance_bias", None)
            if callable(update):
                update()

    # ----------------------------------------------------------------------------- NaN/Inf guard
    def watch_terms(self, terms: dict[str, torch.Tensor]) -> None:
        """Note (on device, no sync) whether each loss term of this batch is finite; `check_finite` acts on it."""
        for name, value in terms.items():
            bad = ~torch.isfinite(value.detach()).all()
            self._nonfinite[name] = bad | self._nonfinite[name] if name in self._nonfinite else bad
        self._last_terms = {name: value.detach() for name, value in terms.items()}

    def check_finite(self) -> None:
        """Before each optimizer step: stop the run (NonFiniteError) when a loss term or the gradient is NaN/Inf
        on any rank. Nothing has been applied yet, so the weights and every checkpoint stay finite.

        One small all-reduce and one host sync per optimizer step.
        """
        names = list(self._nonfinite)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        grad_bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros((), dtype=torch.bool)
        flags = torch.stack([*(self._nonfinite[n] for n in names), grad_bad.to(self.device)]).float()
        flags = self.trainer.strategy.reduce(flags, reduce_op="sum").tolist()
        self._nonfinite = {}
        if not any(flags):
            return
        values = {n: float(v) for n, v in self._last_terms.items()}
        bad = [n for n, f in zip(names, flags) if f and n != "loss"] or [n for n, f in zip(names, flags) if f]
        shown = ", ".join(f"{n}={values.get(n, float('nan')):.6g}" for n in names if n != "loss")
        rank_note = "" if self.trainer.world_size == 1 else " (on at least one rank; values of this rank)"
        if bad:
            raise NonFiniteError(f"non-finite loss term {' and '.join(bad)} at step {self.global_step}{rank_note}: "
                                 f"{shown}. Training stopped before the optimizer step.")
        param = next((n for n, p in self.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()),
                     "a parameter on another rank")
        raise NonFiniteError(f"non-finite gradient at step {self.global_step} (first: {param}) while the loss terms "
                             f"were finite: {shown}. Training stopped before the optimizer step.")

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = split_batch(batch)
        out = self.model(inputs)
        self.val_loss.update(lm_loss(out.logits, targets), weight=targets.numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, sync_dist=False)
        self.log("val/ppl", torch.exp(loss), sync_dist=False)
        if self.trainer.state.fn == "fit":
            self.val_history.append((self.global_step, float(loss)))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        groups = configure_optimizer_groups(self.model, o.weight_decay)
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, o.warmup_steps, self.max_steps, o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _TeacherSlot:
    """Holds the teacher outside the module tree: never in ``state_dict``, ``parameters()`` or the optimizer."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None


class DistillModule(LMModule):
    """Staged KD: ``ce_weight * CE + w(step) * KD + aux`` while KD is on, ``CE + aux`` after the stop step.

    The teacher is loaded lazily by ``teacher_loader`` at the first step that needs it (so a run resumed
    after the stop step never loads it), kept frozen in eval mode and run under inference mode, and
    released (memory freed) at the stop step; from then on it is never run again.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        optim: OptimConfig,
        max_steps: int,
        kd: KDConfig,
        teacher_loader: Callable[[], torch.nn.Module] | None = None,
        teacher: dict[str, str] | None = None,
    ):
        super().__init__(model_cfg, optim, max_steps, kd=kd, teacher=teacher)
        self.schedule = KDSchedule(kd, max_steps)
        self.kd = kd = self.schedule.cfg
        self.teacher_loader = teacher_loader
        self.teacher_info = teacher  # {"path": ..., "sha256": ...} of the configured teacher
        self._slot = _TeacherSlot()
        self.teacher_calls = 0
        self.teacher_released = False
        self.val_kl = MeanMetric()
        self.val_agree = MeanMetric()

    # ----------------------------------------------------------------------------- the teacher
    @property
    def teacher(self) -> torch.nn.Module | None:
        return self._slot.model

    def kd_active(self, step: int | None = None) -> bool:
        return self.teacher_loader is not None and self.schedule.active(self.global_step if step is None else step)

    def ensure_teacher(self) -> torch.nn.Module:
        if self._slot.model is None:
            if self.teacher_released:
                raise RuntimeError("the teacher was released at the KD stop step and must not run again")
            assert self.teacher_loader is not None
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

    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        teacher = self.ensure_teacher()
        self.teacher_calls += 1
        with torch.inference_mode():
            logits = teacher(inputs).logits
        return logits[..., : self.model_cfg.vocab_size]  # padding-only vocabulary entries trimmed

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
            k = self.kd
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
        self.watch_terms(terms)
        self.log("kd/weight", weight)
        self.log("kd/active", float(active))
        self.log_terms("train", terms, out)
        return terms["loss"]

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = split_batch(batch)
        out = self.model(inputs)
        self.val_loss.update(lm_loss(out.logits, targets), weight=targets.numel())
        if self.kd_active() and not self.teacher_released:
            t_logits = self.teacher_logits(inputs)
            mask = loss_mask(batch)
            kl = kl_to_teacher(out.logits, t_logits, mask, chunk_size=self.kd.chunk_size)
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
        super().on_load_checkpoint(checkpoint)
        stop = (checkpoint.get("distill") or {}).get("kd_stop_step", self.schedule.stop_step)
        if stop != self.schedule.stop_step:
            from lightning.pytorch.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(f"the checkpoint was trained with KD stop step {stop}, this run stops KD at "
                           f"{self.schedule.stop_step}: the resumed losses will differ from the original run's.")
        recorded = (checkpoint.get("distill") or {}).get("teacher")
        mine = self.teacher_info
        if recorded and mine and recorded.get("sha256") != mine.get("sha256"):
            from distill.errors import ConfigError

            raise ConfigError(
                "teacher.path",
                f"this checkpoint was distilled from teacher {recorded.get('path')} "
                f"(sha256 {str(recorded.get('sha256'))[:12]}), but the run is configured with "
                f"{mine.get('path')} (sha256 {str(mine.get('sha256'))[:12]}).",
                "resume with the original teacher, or start a new run directory.",
            )
