"""`VLModule`: masked data modeling of a VL-MoE (Shen et al., 2023), with optional staged KD from a VL-MoE.

Each batch is one kind (`batch["kind"]`): "image" (masked image modeling: cross-entropy of the visual head
against the visual tokens on BEiT block-masked patches), "text" (BERT masked language modeling) or "pair"
(masked image-text modeling: both masks on the joint input, the two cross-entropies summed). The masks come
from a generator seeded by (seed, step) in training, so a resumed run masks as the original did, and by
(seed, batch index) in validation, so every evaluation of every model with the same seed sees the same
masks. KD follows `DistillModule`: a lazily loaded, frozen teacher sees the same masked inputs and is
released at the stop step. The model knows nothing of Lightning; this module owns the objective.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric

from distill.config import OptimConfig
from distill.kd import KDConfig, KDSchedule, kd_loss_from_config
from distill.models.fused import FUSED_LAYOUT
from distill.models.vl_config import VLMoEConfig
from distill.models.vlmoe import VLMoE
from distill.train.optim import lightning_optimizers
from distill.train.teacher import LazyTeacher, _TeacherSlot
from distill.vl.masking import IGNORE_INDEX, MaskingConfig, mask_images, mask_text

OBJECTIVES = {"text": "mlm", "image": "mim", "pair": "vl"}  # batch kind -> the name its loss is logged under


class Masked(NamedTuple):
    """One batch with its masks applied: the model's keyword arguments and the targets (-100 off the chosen
    positions; None for an absent modality)."""

    inputs: dict[str, torch.Tensor]
    text_targets: torch.Tensor | None  # [B, L]
    image_targets: torch.Tensor | None  # [B, n_patches]


def seeded_generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded by a stable hash of `parts` (the same in every process and Python run)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def masked_ce(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the positions whose target is not -100 (0 when none), and their count."""
    n = int((targets != IGNORE_INDEX).sum())
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="sum")  # fmt: skip
    return ce / max(n, 1), n


class VLModule(LazyTeacher, L.LightningModule):
    """Masked data modeling: ``loss = objective + aux_coef * aux + z_coef * z``; while KD is on,
    ``ce_weight * objective + w(step) * KD + aux terms``.

    ``special`` holds the tokenizer's ``pad``, ``cls`` and ``mask`` ids. ``teacher_loader`` builds the
    teacher (a VLMoE) at the first step that needs it; ``teacher`` is the ``{path, sha256}`` checkpoints
    record. `load_from_checkpoint` passes the checkpoint's plain hyper-parameters; they become dataclasses.
    """

    def __init__(
        self,
        model_cfg: VLMoEConfig,
        optim: OptimConfig,
        masking: MaskingConfig,
        max_steps: int,
        special: dict[str, int],
        schedule: KDSchedule | None = None,
        teacher_loader: Callable[[], torch.nn.Module] | None = None,
        teacher: dict[str, str] | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(model_cfg, Mapping):  # from a checkpoint's hyper-parameters (validated when saved)
            model_cfg = VLMoEConfig.from_dict(model_cfg)
        if isinstance(optim, Mapping):
            optim = OptimConfig(**optim)
        if isinstance(masking, Mapping):
            masking = MaskingConfig(**masking)
        if isinstance(schedule, Mapping):
            schedule = KDSchedule(KDConfig(**schedule["kd"]), schedule["max_steps"])
        plain_schedule = None if schedule is None else {"kd": dataclasses.asdict(schedule.cfg),
                                                        "max_steps": schedule.max_steps}  # fmt: skip
        # plain containers only: checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({
            "model_cfg": dataclasses.asdict(model_cfg), "optim": dataclasses.asdict(optim),
            "masking": dataclasses.asdict(masking), "max_steps": max_steps, "special": dict(special),
            "schedule": plain_schedule, "teacher": teacher, "seed": seed,
        })  # fmt: skip
        self.model_cfg, self.optim, self.masking = model_cfg, optim, masking.validate()
        self.max_steps, self.special, self.seed = max_steps, dict(special), seed
        self.model = VLMoE(model_cfg)
        self.schedule = schedule
        self.teacher_loader = teacher_loader if schedule is not None and schedule.uses_teacher else None
        self.teacher_info = teacher
        self._slot = _TeacherSlot()  # the teacher stays outside the module tree (state_dict, parameters)
        self.teacher_calls = 0
        self.teacher_released = False
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in OBJECTIVES.values()})
        self.val_history: list[tuple[int, float]] = []  # (step, val loss) of each validation during fit
        self.last_val: dict[str, float | None] = {name: None for name in OBJECTIVES.values()}
        self.step_terms: dict[str, torch.Tensor] = {}  # the last training batch's loss terms (detached)

    # ----------------------------------------------------------------------------- masking
    def train_generator(self, step: int) -> torch.Generator:
        """The masks of training step `step` (per rank: data-parallel ranks draw different masks)."""
        return seeded_generator("train", self.seed, step, self.global_rank)

    def val_generator(self, batch_idx: int) -> torch.Generator:
        """The masks of validation batch `batch_idx`: independent of the step and of the model."""
        return seeded_generator("val", self.seed, batch_idx)

    def mask_batch(self, batch: dict[str, Any], generator: torch.Generator) -> Masked:
        """Draw the batch's masks (text first, then images) and apply them."""
        kind = batch["kind"]
        if kind not in OBJECTIVES:
            raise ValueError(f"batch kind must be one of {sorted(OBJECTIVES)}, got {kind!r}.")
        inputs: dict[str, torch.Tensor] = {}
        text_targets = image_targets = None
        if kind in ("text", "pair"):
            ids, valid = batch["text_ids"], batch["text_mask"].bool()
            special = ~valid | (ids == self.special["pad"]) | (ids == self.special["cls"])
            special[:, 0] = True  # the [CLS] position
            masked_ids, text_targets = mask_text(ids, self.masking, self.special["mask"],
                                                 self.model_cfg.text_vocab_size, generator, special)  # fmt: skip
            inputs.update(text_ids=masked_ids, text_mask=valid)
        if kind in ("image", "pair"):
            images = batch["images"]
            grid = self.model_cfg.image_size // self.model_cfg.patch_size
            image_mask = mask_images(images.shape[0], grid, self.masking, generator).to(images.device)
            image_targets = batch["visual_tokens"].masked_fill(~image_mask, IGNORE_INDEX)
            inputs.update(images=images, image_mask=image_mask)
        return Masked(inputs, text_targets, image_targets)

    @staticmethod
    def objective(out: Any, masked: Masked) -> tuple[torch.Tensor, int]:
        """The masked-modeling loss of one batch (the sum of the present modalities' mean CEs) and the
        number of predicted positions."""
        loss, n = out.aux_loss.new_zeros(()), 0
        for logits, targets in ((out.text_logits, masked.text_targets), (out.image_logits, masked.image_targets)):
            if targets is not None:
                ce, count = masked_ce(logits, targets)
                loss, n = loss + ce, n + count
        return loss, n

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        """Tokens the model encodes for this batch: B * (n_patches + 1) per image, the real text tokens."""
        n = 0
        if "images" in batch and batch["kind"] in ("image", "pair"):
            n += batch["images"].shape[0] * (self.model_cfg.n_patches + 1)
        if "text_mask" in batch and batch["kind"] in ("text", "pair"):
            n += int(batch["text_mask"].sum())
        return n

    # ----------------------------------------------------------------------------- the teacher
    def kd_term(self, out: Any, masked: Masked) -> torch.Tensor:
        """KD on the masked text positions and the masked patches (summed over the present modalities); the
        teacher sees the same masked inputs."""
        teacher = self.ensure_teacher()
        self.teacher_calls += 1
        with torch.inference_mode():
            t_out = teacher(**masked.inputs)
        kd = out.aux_loss.new_zeros(())
        pairs = ((out.text_logits, t_out.text_logits, masked.text_targets),
                 (out.image_logits, t_out.image_logits, masked.image_targets))  # fmt: skip
        for s_logits, t_logits, targets in pairs:
            if targets is not None:
                t_logits = t_logits[..., : s_logits.shape[-1]]  # padding-only vocabulary entries trimmed
                kd = kd + kd_loss_from_config(s_logits, t_logits, targets != IGNORE_INDEX, self.schedule.cfg)
        return kd

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        step, kind = self.global_step, batch["kind"]
        masked = self.mask_batch(batch, self.train_generator(step))
        out = self.model(**masked.inputs)
        obj, _ = self.objective(out, masked)
        aux_terms = self.optim.aux_coef * out.aux_loss + self.optim.z_coef * out.z_loss
        terms = {"loss": obj + aux_terms, "ce": obj, OBJECTIVES[kind]: obj, "aux": out.aux_loss, "z": out.z_loss}
        if self.schedule is not None:
            active = self.schedule.active(step)
            if not active and self.teacher_loader is not None and not self.teacher_released:
                self.release_teacher()
            weight = self.schedule.weight(step) if active else 0.0
            kd = self.kd_term(out, masked) if active else obj.new_zeros(())
            if active:
                terms["loss"] = self.schedule.cfg.ce_weight * obj + weight * kd + aux_terms
            terms["kd"] = kd
            self.log("kd/weight", weight, batch_size=1)
            self.log("kd/active", float(active), batch_size=1)
        self.step_terms = {name: value.detach() for name, value in terms.items()}
        for name, value in self.step_terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=1)
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log_moe_stats(out.moe_stats)
        return terms["loss"]

    def log_moe_stats(self, stats: list) -> None:
        """Per pool: load imbalance (coefficient of variation of tokens per expert) and drop fraction."""
        for s in stats:
            counts = s.stats.tokens_per_expert.detach().float()
            cv = counts.std(unbiased=False) / counts.mean().clamp_min(1e-9)
            self.log(f"moe/b{s.layer}_{s.pool}_load_cv", cv, batch_size=1)
            self.log(f"moe/b{s.layer}_{s.pool}_drop_frac", s.stats.drop_fraction.detach().float(), batch_size=1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for module in self.model.modules():
            update = getattr(module, "update_balance_bias", None)
            if callable(update):
                update()

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        masked = self.mask_batch(batch, self.val_generator(batch_idx))
        out = self.model(**masked.inputs)
        obj, n = self.objective(out, masked)
        if n:
            self.val_metrics[OBJECTIVES[batch["kind"]]].update(obj, weight=n)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # a few batches only: not a validation of the model
            for metric in self.val_metrics.values():
                metric.reset()
            return
        present = []
        for name, metric in self.val_metrics.items():
            value = float(metric.compute()) if metric.update_called else None
            metric.reset()
            self.last_val[name] = value
            if value is not None:
                self.log(f"val/{name}", value)
                present.append(value)
        if not present:
            return
        loss = sum(present) / len(present)
        self.log("val/loss", loss)
        self.log("val/ppl", math.exp(min(loss, 80.0)))
        if self.trainer.state.fn == "fit":
            self.val_history.append((self.global_step, loss))

    def stage_figures(self) -> dict[str, Any]:
        """The last validation's losses (None for a kind not validated), and the KD figures with a schedule."""
        figures: dict[str, Any] = {f"val_{name}": value for name, value in self.last_val.items()}
        if self.schedule is not None:
            figures.update(kd_stop_step=self.schedule.stop_step, teacher_calls=self.teacher_calls)
        return figures

    # ----------------------------------------------------------------------------- checkpoints, optimisation
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fused_layout"] = FUSED_LAYOUT
        stop = self.schedule.stop_step if self.schedule is not None else None
        checkpoint["distill"] = {"teacher": self.teacher_info, "kd_stop_step": stop}

    def configure_optimizers(self) -> dict[str, Any]:
        return lightning_optimizers(self, self.model, self.optim, self.max_steps)
