"""Generation speed of three students of identical architecture (the pipeline's three students differ only in
their weights), measured as the pipeline's report does (`distill.evaluate.generation_speed`: greedy KV-cache
generation, warm-up, then timed runs). Goal: their tokens/s within 10% of each other (spread = (max - min) /
median of the three), since equal architectures must generate equally fast.

Each round measures every student as a report would (after a warm-up, the median of 5 timed runs), the runs of
the three interleaved in a fresh random order (a noisy machine slows all three alike); the spread of each round
is one sample of the figure (`--reps N`: N rounds, default 5).
"""

from __future__ import annotations

import random
import statistics

import torch
from omegaconf import OmegaConf

from distill.bench import fmt, record, reps
from distill.bench.train import CONF, VOCAB
from distill.evaluate import generation_speed
from distill.models import GPT, ModelConfig
from students.config import StudentConfig
from students.mos import derive_student

NEW_TOKENS, BATCH, PROMPT = 64, 4, 16
ROUNDS, RUNS = 5, 5
NAMES = ("student_staged_kd", "student_no_kd", "student_full_kd")


def main() -> None:
    teacher_cfg = ModelConfig.from_dict({**OmegaConf.to_container(OmegaConf.load(CONF)), "vocab_size": VOCAB})
    teacher_cfg.validate()
    student_cfg = derive_student(teacher_cfg, StudentConfig())
    students = {}
    for seed, name in enumerate(NAMES):
        torch.manual_seed(seed)
        students[name] = GPT(student_cfg).eval()

    def run(model: torch.nn.Module, warmup: int = 0) -> float:  # one timed generation
        return generation_speed(model, VOCAB, NEW_TOKENS, BATCH, PROMPT, repeats=1, warmup=warmup)["median"]

    def speeds(order: list[str]) -> dict[str, float]:
        """The pipeline's figure for each student, its median of RUNS timed runs (after the warm-up), the runs of
        the three interleaved: a burst of machine noise slows all three alike."""
        runs: dict[str, list[float]] = {name: [] for name in order}
        for _ in range(RUNS):
            for name in order:
                runs[name].append(run(students[name]))
        return {name: statistics.median(r) for name, r in runs.items()}

    for model in students.values():
        run(model, warmup=1)
    per: dict[str, list[float]] = {name: [] for name in NAMES}
    spreads = []
    order, rng = list(NAMES), random.Random(0)
    for _ in range(reps(ROUNDS)):
        rng.shuffle(order)
        for name, v in speeds(order).items():
            per[name].append(v)
        this = [per[name][-1] for name in NAMES]
        spreads.append(100 * (max(this) - min(this)) / statistics.median(this))
    print(f"3 students of {student_cfg.name} ({GPT(student_cfg).num_params() / 1e6:.2f}M params, different "
          f"weights), greedy KV-cache generation of {NEW_TOKENS} tokens x batch {BATCH} after a {PROMPT}-token "
          f"prompt, CPU threads {torch.get_num_threads()}; per round each student's median of {RUNS} runs (the "
          f"three interleaved) after a warm-up, {len(spreads)} rounds")
    for name in NAMES:
        record(f"{name} generation tokens/s", per[name], unit="tokens/s", better="higher")
        print(f"  {name:24s} {fmt(per[name], 0):>24s} tokens/s")
    record("tokens/s spread of 3 same-architecture students", spreads, unit="%", goal="< 10%")
    print(f"  spread (max - min) / median of the three, per round: {fmt(spreads, 1)} % (goal < 10%)")
