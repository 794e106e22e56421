"""`LMModule`: next-token LM training of a GPT (a teacher, or a student without KD).

The model knows nothing about training; this module owns the objective, the optimizer and the metrics. In
training the loss comes from the model's final hidden states through the fused, chunked LM head
(distill/kd/fused.py: the [tokens x vocabulary] logits never exist) unless `optim.fused_head` is off or the head
weight is a DTensor (tensor parallelism, FSDP); validation always builds the full logits (exact metrics).
Timing, the NaN/Inf guard, checkpoint IO and the RNG stream are callbacks (distill/train/), so the module
holds only what a step computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from distill.config import OptimConfig
from distill.kd.fused import fused_head_loss
from distill.losses import is_dtensor, lm_loss
from distill.models import GPT, ModelConfig
from distill.models.fused import FUSED_LAYOUT
from distill.train.optim import lightning_optimizers

LM_CHUNK = 1024  # tokens per chunk of the fused head and loss in LM training (KDConfig.chunk_size's default)


def loss_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Which target positions count (None: all; packed blocks have no padding)."""
    mask = batch.get("loss_mask")
    return None if mask is None else mask[:, 1:]


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed block of ``seq_len + 1`` tokens -> (inputs, next-token targets)."""
    ids = batch["input_ids"]
    return ids[:, :-1], ids[:, 1:]


class LMModule(L.LightningModule):
    """Next-token LM training: ``loss = CE + aux_coef * aux + z_coef * z``.

    ``model_cfg`` and ``optim`` are validated dataclasses (distill/resolve.py). `load_from_checkpoint` passes
    the plain dicts the checkpoint's hyper-parameters hold; those are turned back into the dataclasses.
    """

    def __init__(self, model_cfg: ModelConfig, optim: OptimConfig, max_steps: int, **extra_hparams: Any):
        super().__init__()
        if isinstance(model_cfg, Mapping):  # from a checkpoint's hyper-parameters (validated when saved)
            model_cfg = ModelConfig.from_dict(model_cfg)
        if isinstance(optim, Mapping):
            optim = OptimConfig(**optim)
        # plain containers only: checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"model_cfg": dataclasses.asdict(model_cfg), "optim": dataclasses.asdict(optim),
                                   "max_steps": max_steps, **extra_hparams})
        self.model_cfg = model_cfg
        self.optim = optim
        self.max_steps = max_steps
        self.model = GPT(model_cfg)
        self.val_loss = MeanMetric()
        self.val_history: list[tuple[int, float]] = []  # (step, val loss) of each validation during fit
        self.step_terms: dict[str, torch.Tensor] = {}  # the last training batch's loss terms (detached)

    # ----------------------------------------------------------------------------- training
    def fused_head(self) -> bool:
        """Whether training takes the fused head and loss (distill/kd/fused.py): `optim.fused_head` and a head
        weight that is a plain tensor (a DTensor, under tensor parallelism or FSDP, keeps the full logits)."""
        return self.optim.fused_head and not is_dtensor(self.model.lm_head.weight)

    def lm_terms(self, batch: dict[str, torch.Tensor], logit_terms: Callable[..., dict[str, torch.Tensor]] | None = None,
                 hidden_terms: Callable[..., dict[str, torch.Tensor]] | None = None,
                 **flags: bool) -> tuple[dict[str, torch.Tensor], Any]:
        """The LM objective's terms for one batch, and the model output (the distillation module reuses it);
        the `flags` that are on (``return_router_logits``, ``return_hidden``) go to the model.
        `logit_terms(logits, targets, mask)` replaces the cross-entropy with terms that include it (``ce``;
        offline KD computes both in one pass over the vocabulary); with the fused head (`fused_head`: the model
        gives ``final_hidden``, no logits) `hidden_terms(final_hidden, head_weight, targets, mask)` does.
        Either may give ``head``, the differentiable head loss (``ce`` otherwise; the fused path's ``ce`` is
        detached); ``loss`` is head + aux + z."""
        inputs, targets = split_batch(batch)
        mask = loss_mask(batch)
        on = {name: True for name, on in flags.items() if on}
        if self.fused_head():
            out = self.model(inputs, return_logits=False, **on)
            weight = self.model.lm_head.weight
            if hidden_terms is None:
                fused = fused_head_loss(out.final_hidden, weight, targets, mask, chunk_size=LM_CHUNK)
                terms = {"head": fused.loss, "ce": fused.ce}
            else:
                terms = hidden_terms(out.final_hidden, weight, targets, mask)
        else:
            out = self.model(inputs, **on)
            terms = {"ce": lm_loss(out.logits, targets, mask)} if logit_terms is None else logit_terms(
                out.logits, targets, mask)
        head = terms.pop("head", None)
        loss = (terms["ce"] if head is None else head) + self.optim.aux_coef * out.aux_loss + self.optim.z_coef * out.z_loss
        return {"loss": loss, **terms, "aux": out.aux_loss, "z": out.z_loss}, out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms, out = self.lm_terms(batch)
        self.finish_step(terms, out)
        return terms["loss"]

    def finish_step(self, terms: dict[str, torch.Tensor], out: Any) -> None:
        """Keep the batch's terms for the NaN/Inf guard (`NonFiniteGuard`) and log them."""
        self.step_terms = {name: value.detach() for name, value in terms.items()}
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss")
        self.log("train/ppl", torch.exp(terms["ce"].detach()))
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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fused_layout"] = FUSED_LAYOUT  # how the fused projections are laid out (distill/models/fused.py)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for module in self.model.modules():
            update = getattr(module, "update_balance_bias", None)
            if callable(update):
                update()

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

    def stage_figures(self) -> dict[str, Any]:
        """What this kind of module adds to its stage's summary (nothing, for plain LM training)."""
        return {}

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        return lightning_optimizers(self, self.model, self.optim, self.max_steps)
