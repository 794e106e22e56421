"""Training speed of the tiny teacher, and the cost of staged KD.

- teacher: training tokens/s of `conf/model/tiny.yaml` (fwd + bwd + AdamW step, batch 16 x 128 tokens).
- KD: the step time of the real `DistillModule` under Lightning, relative to the same student trained
  alone (`LMModule`), while KD is on (goal: within 5% of theory) and after the KD stop step (goal: 1.00 +-
  0.03), next to the theoretical value while KD is on, 1 + teacher forward / student forward+backward, timed
  on the modules' own paths: `DistillModule.teacher_outputs(inputs)` and `LMModule.lm_terms(batch)` + backward.

Every figure is recorded (`distill.bench.record`) from its repeats: the tokens/s of each timed step, and the
ratios of each round (one round runs the three fits in a fresh random order, so machine noise and drift hit
them alike, none always first).
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from distill.bench import fmt, ratios, record, reps, time_interleaved
from distill.config import OptimConfig
from distill.export import export_model
from distill.kd import KDConfig, KDSchedule
from distill.models import GPT, ModelConfig
from distill.train.distill_module import DistillModule
from distill.train.lm_module import LMModule
from students.config import StudentConfig
from students.mos import derive_student
from teachers.native import ExportTeacher

CONF = Path(__file__).resolve().parents[2] / "conf" / "model" / "tiny.yaml"
VOCAB, SEQ, BATCH = 4096, 128, 16
STEPS, SKIP, ROUNDS = 14, 4, 7


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
    return statistics.median(fit_steps(module, skip, data))


def fit_steps(module: L.LightningModule, skip: int, data: Any = None) -> list[float]:
    """The step times of a short fit on ``data`` (default: random blocks), after ``skip`` steps."""
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
    return timer.times[skip:]


def teacher_tokens_per_s(cfg) -> list[float]:
    """Training tokens/s of each timed step of a short fit."""
    module = LMModule(cfg, OptimConfig(), STEPS)
    return [BATCH * SEQ / t for t in fit_steps(module, SKIP)]


def theoretical_kd_ratios(kd: DistillModule, student: LMModule, rounds: int = 8) -> list[float]:
    """1 + teacher forward / student forward+backward, per interleaved round, on the modules' own paths:
    `DistillModule.teacher_outputs` (whatever it does to make the teacher cheap) and `LMModule.lm_terms`
    (whatever head and loss it uses) + backward."""
    x = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x}
    kd.ensure_teacher()

    def student_fwd_bwd() -> None:
        terms, _ = student.lm_terms(batch)
        terms["loss"].backward()

    def teacher_fwd() -> None:
        kd.teacher_outputs(x[:, :-1])

    times = time_interleaved(
        {"s": student_fwd_bwd, "t": teacher_fwd},
        reps=rounds,
        warmup=2,
        setup=lambda: student.zero_grad(set_to_none=True),
    )
    return [1.0 + r for r in ratios(times["t"], times["s"])]


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
    tps = teacher_tokens_per_s(teacher_cfg)
    record("tiny teacher training tokens/s", tps, unit="tokens/s", better="higher")
    print(f"tiny teacher training: {fmt(tps, 0)} tokens/s (fwd+bwd+AdamW, Lightning; each timed step)")

    rounds = reps(ROUNDS)
    with TemporaryDirectory() as tmp:
        export = export_model(GPT(teacher_cfg), teacher_cfg, Path(tmp) / "teacher")
        source = ExportTeacher(export)
        kd = DistillModule(student_cfg, OptimConfig(), KDSchedule(KDConfig(), STEPS), teacher_loader=source.load)
        theory = theoretical_kd_ratios(kd, LMModule(student_cfg, OptimConfig(), STEPS), reps(8))
        del kd
        fits = {
            "base": lambda: LMModule(student_cfg, OptimConfig(), STEPS),
            "on": lambda: DistillModule(student_cfg, OptimConfig(), KDSchedule(KDConfig(), STEPS),
                                        teacher_loader=source.load),
            "off": lambda: DistillModule(student_cfg, OptimConfig(), KDSchedule(KDConfig(stop_step=2), STEPS),
                                         teacher_loader=source.load),
        }
        on, off = [], []
        order, rng = list(fits), random.Random(0)
        for _ in range(rounds):  # each round runs the three fits in a fresh order: noise and drift hit them alike
            rng.shuffle(order)
            t = {name: fit_step_time(fits[name]()) for name in order}
            on.append(t["on"] / t["base"])
            off.append(t["off"] / t["base"])
    t = record("KD-on theory: 1 + teacher fwd / student fwd+bwd", theory)
    record("distillation / student-only step, KD on", on, goal=f"within 5% of {t:.3f} (theory)")
    record("distillation / student-only step, after KD stop", off, goal="1.00 +- 0.03")
    print(f"{'distillation step / student-only step':<44}{'measured':>22}{'theory':>22}  goal")
    print(f"{'  while KD is on':<44}{fmt(on):>22}{fmt(theory):>22}  within 5% of theory")
    print(f"{'  after the KD stop step':<44}{fmt(off):>22}{'1.000':>22}  1.00 +- 0.03")


def fit_step_time(module: L.LightningModule) -> float:
    return fit_step_times(module, SKIP)
