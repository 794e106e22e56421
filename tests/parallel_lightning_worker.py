"""One rank of the Lightning-level expert-parallel checks (started by tests/test_parallel.py per rank).

    python tests/parallel_lightning_worker.py OUT_DIR     (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_* in the env)

Lightning sees LOCAL_RANK and so does not launch processes itself. Several `Trainer.fit` runs in the
same two processes, every one with `ExpertParallelStrategy` on gloo:

  A  pretrain at ep=2 from the seed, 4 steps, checkpoints at steps 2 and 4
  B  the same at ep=1 (data parallel, replicated experts)
  C  ep=1 resumed from A's step-2 checkpoint;  D  ep=2 resumed from B's step-2 checkpoint
  E, F  distillation at ep=2 and ep=1 (the teacher is sharded when the module loads it)

Each rank writes its per-step losses and a few facts to OUT_DIR/rank{R}.json; the test compares.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from distill.config import OptimConfig
from distill.kd import KDConfig, KDSchedule
from distill.models import GPT, ModelConfig
from distill.moe import MoEConfig
from distill.parallel import ExpertParallelStrategy
from distill.train.distill_module import DistillModule
from distill.train.lm_module import LMModule

SEQ, VOCAB, BATCH, MAX_STEPS = 16, 64, 2, 4
MOE = MoEConfig(top_k=1, residual=True, capacity_factor=1.0, min_capacity=2, aux_free_bias=True)
STUDENT = ModelConfig(name="s", vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=2, max_seq_len=SEQ,
                      num_experts=[4, 2], moe=MOE)
TEACHER = ModelConfig(name="t", vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=2, max_seq_len=SEQ,
                      num_experts=[8, 4], moe=MOE)
# A large AdamW eps keeps updates smooth in the gradient (with 1e-8, g / (|g| + eps) turns a 1e-9 gradient
# difference near g = 0 into a full +-lr step, so two equally correct runs drift apart by ~1e-5).
OPTIM = OptimConfig(warmup_steps=1, eps=1e-3)


class RecordLosses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


def loader(world: int) -> DataLoader:
    """2 steps per epoch on each rank, so a step-2 checkpoint resumes at an epoch boundary."""
    ids = torch.randint(VOCAB, (2 * world * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=BATCH, shuffle=False)


def fit(module: L.LightningModule, ep: int, ckpt_dir: Path | None, resume: Path | None,
        world: int) -> dict[int, float]:
    record = RecordLosses()
    callbacks: list[Callback] = [record]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=2,
                                         save_top_k=-1, auto_insert_metric_name=False))
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=ExpertParallelStrategy(ep_size=ep, timeout_s=60),
        max_steps=MAX_STEPS, gradient_clip_val=0.5, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        enable_checkpointing=ckpt_dir is not None, callbacks=callbacks,
    )
    trainer.fit(module, train_dataloaders=loader(world), ckpt_path=str(resume) if resume else None)
    return record.losses


def lm(seed: int = 0) -> LMModule:
    torch.manual_seed(seed)
    return LMModule(STUDENT, OPTIM, MAX_STEPS)


def teacher() -> torch.nn.Module:
    torch.manual_seed(1)
    return GPT(TEACHER)


def main(out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    res: dict[str, Any] = {}
    a = lm()
    res["A"] = fit(a, 2, out / "A", None, world)
    res["A_experts_after_fit"] = [list(layer.experts.w_in.shape) for layer in a.model.moe_layers]
    res["A_bias"] = [layer.router.balance_bias.tolist() for layer in a.model.moe_layers]
    b = lm()
    res["B"] = fit(b, 1, out / "B", None, world)
    res["B_bias"] = [layer.router.balance_bias.tolist() for layer in b.model.moe_layers]
    res["C"] = fit(lm(seed=5), 1, None, out / "A" / "step2.ckpt", world)
    res["D"] = fit(lm(seed=5), 2, None, out / "B" / "step2.ckpt", world)
    for name, ep in (("E", 2), ("F", 1)):
        torch.manual_seed(0)
        module = DistillModule(STUDENT, OPTIM, KDSchedule(KDConfig(), MAX_STEPS), teacher_loader=teacher)
        res[name] = fit(module, ep, None, None, world)
        res[f"{name}_teacher_experts"] = [list(layer.experts.w_in.shape) for layer in module.teacher.moe_layers]
        res[f"{name}_teacher_calls"] = module.teacher_calls
    (out / f"rank{rank}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
