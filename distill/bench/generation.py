"""Generation speed of three students of identical architecture (the pipeline's three students differ only in
their weights), measured as the pipeline's report does (`distill.evaluate.generation_speeds`: greedy KV-cache
generation of the models together, a warm-up each, then the median of 5 timed runs each, the runs of the models
interleaved). Goal: their tokens/s within 10% of each other (spread = (max - min) / median of the three), since
equal architectures must generate equally fast.

Each round measures the three in a fresh random order; the spread of each round is one sample of the figure
(`--reps N`: N rounds, default 5)."""

from __future__ import annotations

import random
import statistics

import torch
from omegaconf import OmegaConf

from distill.bench import fmt, record, reps
from distill.bench.train import CONF, VOCAB
from distill.evaluate import generation_speeds
from distill.models import GPT, ModelConfig
from students.config import StudentConfig
from students.mos import derive_student

NEW_TOKENS, BATCH, PROMPT = 64, 4, 16
ROUNDS, RUNS = 5, 5  # RUNS: timed runs per student, as the pipeline's report (generation_speeds' default)
NAMES = ("student_staged_kd", "student_no_kd", "student_full_kd")


def main() -> None:
    teacher_cfg = ModelConfig.from_dict({**OmegaConf.to_container(OmegaConf.load(CONF)), "vocab_size": VOCAB})
    teacher_cfg.validate()
    student_cfg = derive_student(teacher_cfg, StudentConfig())
    students = {}
    for seed, name in enumerate(NAMES):
        torch.manual_seed(seed)
        students[name] = GPT(student_cfg).eval()

    per: dict[str, list[float]] = {name: [] for name in NAMES}
    spreads = []
    order, rng = list(NAMES), random.Random(0)
    for _ in range(reps(ROUNDS)):
        rng.shuffle(order)  # the pipeline's figure: each student's median of 5 runs, the three interleaved
        for name, g in generation_speeds({n: students[n] for n in order}, VOCAB, NEW_TOKENS, BATCH, PROMPT,
                                         repeats=RUNS).items():
            per[name].append(g["median"])
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
