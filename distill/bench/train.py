"""Training speed of the tiny teacher, and the cost of staged KD.

- teacher: training tokens/s of `conf/model/tiny.yaml` (fwd + bwd + AdamW step, batch 16 x 128 tokens).
- KD: the step time of the real `DistillModule` under Lightning, relative to the same student trained
  alone (`LMModule`), while KD is on and after the KD stop step (goal: 1.00 within noise), next to the
  theoretical value while KD is on, 1 + teacher forward / student forward+backward.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from distill.bench import median_ratio, time_interleaved
from distill.config import OptimConfig
from distill.export import export_model
from distill.kd import KDConfig, KDSchedule
from distill.losses import lm_loss
from distill.models import GPT, ModelConfig
from distill.train.distill_module import DistillModule
from distill.train.lm_module import LMModule
from students.config import StudentConfig
from students.mos import derive_student
from teachers.native import ExportTeacher

CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "tiny.yaml"
VOCAB, SEQ, BATCH = 4096, 128, 16
STEPS, SKIP, ROUNDS = 14, 4, 3


class RandomBlocks(Dataset):
    def __init__(self, n: int):
        self.data = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i]}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)


def fit_step_times(module: L.LightningModule, skip: int, data: Any = None) -> float:
    """The median step time of a short fit on ``data`` (default: random blocks), after ``skip`` steps."""
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    data = RandomBlocks(STEPS * BATCH) if data is None else data
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=BATCH))
    return statistics.median(timer.times[skip:])


def teacher_tokens_per_s(cfg) -> float:
    module = LMModule(cfg, OptimConfig(), STEPS)
    return BATCH * SEQ / fit_step_times(module, SKIP)


def theoretical_kd_ratio(teacher: torch.nn.Module, student: torch.nn.Module) -> float:
    x = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    inp, tgt = x[:, :-1], x[:, 1:]

    def student_fwd_bwd() -> None:
        out = student(inp)
        (lm_loss(out.logits, tgt) + 0.01 * out.aux_loss).backward()

    def teacher_fwd() -> None:
        with torch.inference_mode():
            teacher(inp)

    times = time_interleaved(
        {"s": student_fwd_bwd, "t": teacher_fwd},
        reps=8,
        warmup=2,
        setup=lambda: student.zero_grad(set_to_none=True),
    )
    return 1.0 + median_ratio(times["t"], times["s"])


def main() -> None:
    torch.manual_seed(0)
    teacher_cfg = ModelConfig.from_dict({**OmegaConf.to_container(OmegaConf.load(CONF)), "vocab_size": VOCAB})
    teacher_cfg.validate()
    student_cfg = derive_student(teacher_cfg, StudentConfig())
    print(
        f"teacher {teacher_cfg.name}: {GPT(teacher_cfg).num_params() / 1e6:.2f}M params; "
        f"student {student_cfg.name}: {GPT(student_cfg).num_params() / 1e6:.2f}M params; "
        f"batch {BATCH} x {SEQ} tokens, CPU threads {torch.get_num_threads()}"
    )
    print(
        f"tiny teacher training: {teacher_tokens_per_s(teacher_cfg):,.0f} tokens/s (fwd+bwd+AdamW, Lightning)"
    )

    with TemporaryDirectory() as tmp:
        export = export_model(GPT(teacher_cfg), teacher_cfg, Path(tmp) / "teacher")
        source = ExportTeacher(export)
        teacher = source.load()
        theory = theoretical_kd_ratio(teacher, GPT(student_cfg))
        on, off = [], []
        for _ in range(ROUNDS):  # rounds alternate the three runs so machine noise hits them alike
            base = fit_step_times(LMModule(student_cfg, OptimConfig(), STEPS), SKIP)
            kd_on = fit_step_times(
                DistillModule(
                    student_cfg,
                    OptimConfig(),
                    KDSchedule(KDConfig(), STEPS),
                    teacher_loader=source.load,
                ),
                SKIP,
            )
            kd_off = fit_step_times(
                DistillModule(
                    student_cfg,
                    OptimConfig(),
                    KDSchedule(KDConfig(stop_step=2), STEPS),
                    teacher_loader=source.load,
                ),
                SKIP,
            )
            on.append(kd_on / base)
            off.append(kd_off / base)
    print(f"{'distillation step / student-only step':<44}{'measured':>10}{'theory':>10}")
    print(f"{'  while KD is on':<44}{statistics.median(on):>10.3f}{theory:>10.3f}")
    print(f"{'  after the KD stop step (goal 1.00)':<44}{statistics.median(off):>10.3f}{1.0:>10.3f}")
