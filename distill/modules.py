"""LightningModules: LM pretraining (teacher or student) and, in later sections, distillation.

The model knows nothing about training; this module owns the objective, the optimizer and the metrics.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric

from distill.config import OptimConfig
from distill.models import ModelConfig, build_model, configure_optimizer_groups


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed block of ``seq_len + 1`` tokens -> (inputs, next-token targets)."""
    ids = batch["input_ids"]
    return ids[:, :-1], ids[:, 1:]


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class LMModule(L.LightningModule):
    """Next-token LM training: ``loss = CE + aux_coef * aux + z_coef * z``."""

    def __init__(self, model_cfg: ModelConfig, optim: OptimConfig, max_steps: int):
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg = model_cfg
        self.optim = optim
        self.max_steps = max_steps
        self.model = build_model(model_cfg)
        self.val_loss = MeanMetric()
        self._t_last: float | None = None
        self.tokens_seen = 0
        self.train_time_s = 0.0  # wall time of timed steps (the first step, with warm-up, excluded)
        self.train_tokens_timed = 0

    # ----------------------------------------------------------------------------- training
    def lm_terms(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """The LM objective's terms for one batch, and the model output (the distillation module reuses it)."""
        inputs, targets = split_batch(batch)
        out = self.model(inputs)
        ce = token_ce(out.logits, targets)
        loss = ce + self.optim.aux_coef * out.aux_loss + self.optim.z_coef * out.z_loss
        return {"loss": loss, "ce": ce, "aux": out.aux_loss, "z": out.z_loss}, out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms, out = self.lm_terms(batch)
        self.log_terms("train", terms, out)
        return terms["loss"]

    def log_terms(self, prefix: str, terms: dict[str, torch.Tensor], out: Any) -> None:
        for name, value in terms.items():
            self.log(f"{prefix}/{name}", value.detach(), prog_bar=name == "loss")
        self.log(f"{prefix}/ppl", torch.exp(terms["ce"].detach()))
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log_moe_stats(out.moe_stats)

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
        for module in self.model.modules():
            update = getattr(module, "update_balance_bias", None)
            if callable(update):
                update()

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = split_batch(batch)
        out = self.model(inputs)
        self.val_loss.update(token_ce(out.logits, targets), weight=targets.numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, sync_dist=False)
        self.log("val/ppl", torch.exp(loss), sync_dist=False)

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        groups = configure_optimizer_groups(self.model, o.weight_decay)
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, o.warmup_steps, self.max_steps, o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
