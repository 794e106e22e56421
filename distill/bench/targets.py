"""Offline teacher targets (distill/kd/targets.py): what they cost to store and to make, and what they save.

- bytes per token of the stored targets at k = 32 with the router targets (goal: at most 200; DistillKit's
  compressed logits are about 300 B/token);
- the teacher-target pass in tokens/s (the tiny teacher, batch 16 x 128 tokens);
- the distillation step with offline targets over the student-only step (goal: at most 1.10), next to the
  online step's ratio, both measured in the same rounds.

Recorded (`distill.bench.record`) from repeats: the target pass is built anew each repeat (into its own
directory), the ratios once per round.
"""

from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from datasets import Dataset, concatenate_datasets
from omegaconf import OmegaConf

from distill.bench import fmt, record, reps
from distill.bench.train import BATCH, CONF, ROUNDS, SEQ, SKIP, STEPS, VOCAB, fit_step_times
from distill.config import OptimConfig
from distill.export import export_model
from distill.kd import KDConfig, KDSchedule
from distill.kd.targets import build_targets
from distill.models import GPT, ModelConfig
from distill.train.distill_module import DistillModule
from distill.train.lm_module import LMModule
from students.config import StudentConfig
from students.mos import derive_student
from teachers.native import ExportTeacher

K = 32


def main() -> None:
    torch.manual_seed(0)
    teacher_cfg = ModelConfig.from_dict({**OmegaConf.to_container(OmegaConf.load(CONF)), "vocab_size": VOCAB})
    teacher_cfg.validate()
    student_cfg = derive_student(teacher_cfg, StudentConfig())
    ids = torch.randint(0, VOCAB, (STEPS * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    blocks = Dataset.from_dict({"input_ids": ids.tolist()})
    rounds = reps(ROUNDS)
    with TemporaryDirectory() as tmp:
        teacher = GPT(teacher_cfg).eval()
        metas = []
        for r in range(rounds):
            targets = build_targets(teacher, blocks, Path(tmp) / f"targets{r}", {}, k=K, temperature=1.0,
                                    batch_size=BATCH, progress=False)
            metas.append(json_meta(Path(tmp) / f"targets{r}"))
        meta = metas[0]
        size = record(f"stored targets bytes/token (k={K}, router targets)", [m["bytes_per_token"] for m in metas],
                      unit="B/token", goal="<= 200")
        tps = [m["tokens_per_s"] for m in metas]
        record("teacher-target pass tokens/s", tps, unit="tokens/s", better="higher")
        print(f"stored targets at k={K} with router targets ({teacher_cfg.num_moe_layers} MoE layers, the "
              f"{meta['router_topk']} most probable experts of each): {size:.1f} bytes/token (goal <= 200)")
        print(f"teacher-target pass: {fmt(tps, 0)} tokens/s")
        with_targets = concatenate_datasets([blocks, targets], axis=1).with_format("torch")
        source = ExportTeacher(export_model(teacher, teacher_cfg, Path(tmp) / "teacher"))
        offline, online = [], []
        for _ in range(rounds):  # rounds alternate the runs so machine noise hits them alike
            base = fit_step_times(LMModule(student_cfg, OptimConfig(), STEPS), SKIP, with_targets)
            off = fit_step_times(DistillModule(student_cfg, OptimConfig(), KDSchedule(
                KDConfig(teacher_targets="offline", topk=K), STEPS), teacher_loader=source.load), SKIP, with_targets)
            on = fit_step_times(DistillModule(student_cfg, OptimConfig(), KDSchedule(KDConfig(), STEPS),
                                              teacher_loader=source.load), SKIP, with_targets)
            offline.append(off / base)
            online.append(on / base)
    record(f"offline-targets step / student-only step (k={K})", offline, goal="<= 1.10")
    record("online-teacher step / student-only step", online)
    print(f"{'distillation step / student-only step':<44}{'measured':>22}")
    print(f"{'  offline targets, k=32 (goal <= 1.10)':<44}{fmt(offline):>22}")
    print(f"{'  online teacher':<44}{fmt(online):>22}")


def json_meta(path: Path) -> dict:
    from distill.kd.targets import read_meta

    meta = read_meta(path)
    assert meta is not None
    return meta
