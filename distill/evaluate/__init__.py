"""Evaluation: generation speed (used by the pipeline's report) and `python -m distill.evaluate`.

`python -m distill.evaluate eval.model=<export dir or .ckpt>` (distill/evaluate/__main__.py) measures the
perplexity of a model on the test and validation splits and runs lm-evaluation-harness tasks on it
(`distill.evaluate.harness`), the project's own multiple-choice task included (`distill.eval_tasks`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


@torch.no_grad()
def generation_speed(
    model: torch.nn.Module, vocab_size: int, new_tokens: int = 64, batch: int = 4, prompt_len: int = 16,
    seed: int = 0, repeats: int = 5, warmup: int = 1,
) -> dict[str, Any]:
    """Greedy KV-cache generation speed over a batch of random prompts: `warmup` untimed generations of
    the full length, then `repeats` timed ones. Returns the new tokens/s of each timed run (`samples`), their
    `median` and `spread` ((max - min) / median, the same definition as `distill.bench.record`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (batch, prompt_len), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        for _ in range(warmup):
            model.generate(prompt, max_new_tokens=new_tokens, greedy=True)
        samples = []
        for _ in range(max(1, repeats)):
            sync()
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens, greedy=True)
            sync()
            samples.append(batch * new_tokens / (time.perf_counter() - t0))
    finally:
        model.train(was_training)
    median = statistics.median(samples)
    return {"median": median, "spread": (max(samples) - min(samples)) / median, "samples": samples}


def generation_tokens_per_s(
    model: torch.nn.Module, vocab_size: int, new_tokens: int = 64, batch: int = 4, prompt_len: int = 16,
    seed: int = 0, repeats: int = 5, warmup: int = 1,
) -> float:
    """Greedy KV-cache generation speed: new tokens per second over a batch of random prompts, the median of
    `repeats` timed runs after `warmup` untimed ones (`generation_speed` also gives the runs and their spread)."""
    return generation_speed(model, vocab_size, new_tokens, batch, prompt_len, seed, repeats, warmup)["median"]
