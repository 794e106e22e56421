"""One rank of the Lightning-level mesh checks (started by tests/test_parallel.py per rank).

    python tests/parallel_lightning_worker.py OUT_DIR JOB      (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_* in the env)

Lightning sees LOCAL_RANK and does not launch processes itself. Every run uses `MeshStrategy` on gloo and
the same global batch of G = 8 sequences per step, G/W on each rank. The MoE layers are dropless and the
objective is the mean token CE (the load-balancing loss of a micro-batch is not linear in its tokens), so
1, 2 and 4 processes train exactly the same steps. Jobs (run in order):

  two:   B  fresh at ep=2 (2 processes), 4 steps (one epoch), checkpoints at steps 2 and 4
  kill:  the same at ep=2 x dp_shard=2 on 4 processes, SIGKILLed (all ranks) when step 3 is done
  four:  A  fresh at ep=2 x dp_shard=2;  D  B's step 2 resumed at ep=2 x dp_shard=2;
         R  the killed run resumed from its newest good checkpoint (as resume=auto picks it);
         K  distillation, student ep=2 x dp_shard=2, teacher ep=4
  one:   F  fresh with Lightning's one-device strategy (single-file checkpoints);
         C1 A's step 2 resumed on one process;  E  B's step 2 resumed on one process;  K1 distillation
  two2:  C2 A's step 2 resumed at ep=2;  G  F's step-2 file resumed at ep=2
  tp:    T  fresh at tp=2 x ep=2 (tensor-expert: the two ranks of a tp group read the same rows);
         KT distillation, student tp=2 x ep=2, teacher tp=2 x dp_shard=2
  one:   (also) T1 T's step 2 resumed on one process

Each run's per-step loss (the mean over the step's M micro-batches) goes to OUT_DIR/JOB.json (rank 0).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from distill.config import OptimConfig
from distill.kd import KDConfig, KDSchedule
from distill.models import GPT, ModelConfig
from distill.moe import MoEConfig
from distill.parallel import MeshStrategy
from distill.train.distill_module import DistillModule
from distill.train.lm_module import LMModule
from distill.train.resume import inspect_checkpoint, latest_good_checkpoint

SEQ, VOCAB, G, MAX_STEPS = 16, 64, 8, 4
MOE = MoEConfig(top_k=1, residual=True, dropless=True, aux_free_bias=True)
STUDENT = ModelConfig(name="s", vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=2, max_seq_len=SEQ,
                      num_experts=[4, 2], moe=MOE)
TEACHER = ModelConfig(name="t", vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=2, max_seq_len=SEQ,
                      num_experts=[8, 4], moe=MOE)
# A large AdamW eps keeps updates smooth in the gradient (with 1e-8, g / (|g| + eps) turns a 1e-9 gradient
# difference near g = 0 into a full +-lr step).
RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # Lightning's teardown deletes WORLD_SIZE
OPTIM = OptimConfig(warmup_steps=1, eps=1e-3, aux_coef=0.0, z_coef=0.0)


class RecordLosses(Callback):
    """Every rank's loss per step; the step means over all ranks at the end of fit."""

    def __init__(self) -> None:
        self.local: list[tuple[int, float]] = []
        self.steps: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.local.append((trainer.global_step - 1, float(outputs["loss"])))

    def on_fit_end(self, trainer: L.Trainer, module: Any) -> None:
        gathered: list[Any] = [None] * trainer.world_size
        if dist.is_initialized():
            dist.all_gather_object(gathered, self.local)
        else:  # Lightning's one-device strategy: no process group
            gathered = [self.local]
        per_step: dict[int, list[float]] = {}
        for rank_losses in gathered:
            for step, loss in rank_losses:
                per_step.setdefault(step, []).append(loss)
        self.steps = {s: sum(v) / len(v) for s, v in per_step.items()}


def loader(rank: int, world: int, start: int) -> DataLoader:
    """Steps `start`..MAX_STEPS-1 of the global batches, rank r's G/W rows of each. (A resumed run is given
    the steps it has left: where a loader resumes is the data module's business.)"""
    ids = torch.randint(VOCAB, (MAX_STEPS, G, SEQ + 1), generator=torch.Generator().manual_seed(1))
    b = G // world
    mine = torch.cat([ids[s, rank * b : (rank + 1) * b] for s in range(start, MAX_STEPS)])
    return DataLoader([{"input_ids": row} for row in mine], batch_size=b, shuffle=False)


class KillAll(Callback):
    """SIGKILL every rank of the job (no clean-up of any kind) once step `step` is done."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.pids: list[Any] = []

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        self.pids = [None] * trainer.world_size
        dist.all_gather_object(self.pids, os.getpid())

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            dist.barrier()
            if trainer.global_rank == 0:
                for pid in [*self.pids[1:], self.pids[0]]:
                    os.kill(pid, signal.SIGKILL)
            time.sleep(60)


def fit(module: L.LightningModule, layout: dict[str, int] | None, ckpt_dir: Path | None, resume: Path | None,
        teacher_layout: dict[str, int] | None = None, kill_at: int | None = None) -> dict[int, float]:
    rank, world = RANK, WORLD
    record = RecordLosses()
    callbacks: list[Callback] = [record] if kill_at is None else [record, KillAll(kill_at)]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=2,
                                         save_top_k=-1, auto_insert_metric_name=False))
    trainer = L.Trainer(
        accelerator="cpu", devices=world,
        strategy=("auto" if layout is None  # Lightning's own one-device strategy, single-file checkpoints
                  else MeshStrategy(layout, teacher_layout=teacher_layout, timeout_s=60, process_group_backend="gloo")),
        max_steps=MAX_STEPS, gradient_clip_val=0.5, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        enable_checkpointing=ckpt_dir is not None, callbacks=callbacks, use_distributed_sampler=False,
    )
    start = inspect_checkpoint(resume)[1] if resume else 0
    tp = (layout or {}).get("tp", 1)  # a tensor-parallel group shares one data-parallel rank's rows
    trainer.fit(module, train_dataloaders=loader(rank // tp, world // tp, start or 0),
                ckpt_path=str(resume) if resume else None)
    return record.steps


def lm(seed: int = 0) -> LMModule:
    torch.manual_seed(seed)
    return LMModule(STUDENT, OPTIM, MAX_STEPS)


def teacher() -> torch.nn.Module:
    torch.manual_seed(1)
    return GPT(TEACHER)


def distill() -> DistillModule:
    torch.manual_seed(0)
    return DistillModule(STUDENT, OPTIM, KDSchedule(KDConfig(), MAX_STEPS), teacher_loader=teacher)


def _remember(loader: Any, seen: list[Any]) -> Any:
    """The loader, keeping a weak reference to what it returned (after the strategy has wrapped it)."""

    class Remembering:
        def __init__(self) -> None:
            self.sharded = None

        def __call__(self) -> torch.nn.Module:
            model = loader()
            seen.append(weakref.ref(model))
            return model

    return Remembering()


def main(out: Path, job: str) -> None:
    torch.set_num_threads(1)
    res: dict[str, Any] = {}
    if job == "two":
        res["B"] = fit(lm(), {"ep": 2, "dp_shard": 1}, out / "B", None)
    elif job == "kill":
        fit(lm(), {"ep": 2, "dp_shard": 2}, out / "killed", None, kill_at=3)
    elif job == "four":
        res["A"] = fit(lm(), {"ep": 2, "dp_shard": 2}, out / "A", None)
        res["D"] = fit(lm(seed=5), {"ep": 2, "dp_shard": 2}, None, out / "B" / "step2.ckpt")
        resume = latest_good_checkpoint(out / "killed")
        res["R_from"] = resume.name if resume else None
        res["R"] = fit(lm(seed=5), {"ep": 2, "dp_shard": 2}, out / "killed", resume)
        module = distill()
        res["K"] = fit(module, {"ep": 2, "dp_shard": 2}, None, None, teacher_layout={"ep": 4, "dp_shard": 1})
        kd = module.step_terms["kd"].detach().clone()  # the last step's KD term, averaged over the ranks
        dist.all_reduce(kd)
        res["K_kd"] = float(kd) / WORLD
        res["K_teacher_calls"] = module.teacher_calls
        # staged: KD stops at step 2, the sharded teacher is released on every rank (nothing keeps it alive)
        module = DistillModule(STUDENT, OPTIM, KDSchedule(KDConfig(stop_step=2), MAX_STEPS), teacher_loader=teacher)
        seen: list[Any] = []
        module.teacher_loader = _remember(module.teacher_loader, seen)
        fit(module, {"ep": 2, "dp_shard": 2}, None, None, teacher_layout={"ep": 4, "dp_shard": 1})
        gc.collect()
        alive = torch.tensor([float(seen[0]() is not None)])
        dist.all_reduce(alive)
        res["S_teacher_calls"], res["S_released"] = module.teacher_calls, module.teacher_released
        res["S_teachers_alive"] = int(alive.item())
    elif job == "tp":
        res["T"] = fit(lm(), {"tp": 2, "ep": 2, "dp_shard": 1}, out / "T", None)
        module = distill()
        res["KT"] = fit(module, {"tp": 2, "ep": 2, "dp_shard": 1}, None, None,
                        teacher_layout={"tp": 2, "dp_shard": 2})
        kd = module.step_terms["kd"].detach().clone()
        dist.all_reduce(kd)
        res["KT_kd"] = float(kd) / WORLD
    elif job == "one":
        res["T1"] = fit(lm(seed=5), {}, None, out / "T" / "step2.ckpt")
        res["F"] = fit(lm(), None, out / "F", None)  # strategy=auto: a .ckpt file
        res["C1"] = fit(lm(seed=5), {}, None, out / "A" / "step2.ckpt")
        res["E"] = fit(lm(seed=5), {}, None, out / "B" / "step2.ckpt")
        module = distill()
        res["K1"] = fit(module, {}, None, None)
        res["K1_kd"] = float(module.step_terms["kd"])
        res["K1_teacher_calls"] = module.teacher_calls
    elif job == "two2":
        res["C2"] = fit(lm(seed=5), {"ep": 2, "dp_shard": 1}, None, out / "A" / "step2.ckpt")
        res["G"] = fit(lm(seed=5), {"ep": 2, "dp_shard": 1}, None, out / "F" / "step2.ckpt")  # the file, on a mesh
    if RANK == 0:
        (out / f"{job}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    # Leave without the interpreter's teardown: in CI a rank of the tp job whose work had all finished aborted
    # there ("terminate called without an active exception", exit -6) while destroying gloo's threads.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
