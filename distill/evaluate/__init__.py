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
def generation_speeds(
    models: dict[str, torch.nn.Module], vocab_size: int, new_tokens: int = 64, batch: int = 4, prompt_len: int = 16,
    seed: int = 0, repeats: int = 5, warmup: int = 1,
) -> dict[str, dict[str, Any]]:
    """Greedy KV-cache generation speed of several models over the same batch of random prompts: `warmup`
    untimed generations of each, then `repeats` rounds timing one generation of each model in turn, so that a
    slow spell of a shared machine slows every model alike. Per model: the new tokens/s of each timed run
    (`samples`), their `median` and `spread` ((max - min) / median, the definition of `distill.bench.record`)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (batch, prompt_len), generator=g)
    modes = {name: m.training for name, m in models.items()}
    samples: dict[str, list[float]] = {name: [] for name in models}
    try:
        for m in models.values():
            m.eval()
            for _ in range(warmup):
                m.generate(prompt.to(_device(m)), max_new_tokens=new_tokens, greedy=True)
        for _ in range(max(1, repeats)):
            for name, m in models.items():
                samples[name].append(batch * new_tokens / _timed(m, prompt.to(_device(m)), new_tokens))
    finally:
        for name, m in models.items():
            m.train(modes[name])
    out = {}
    for name, runs in samples.items():
        median = statistics.median(runs)
        out[name] = {"median": median, "spread": (max(runs) - min(runs)) / median, "samples": runs}
    return out


def generation_speed(
    model: torch.nn.Module, vocab_size: int, new_tokens: int = 64, batch: int = 4, prompt_len: int = 16,
    seed: int = 0, repeats: int = 5, warmup: int = 1,
) -> dict[str, Any]:
    """`generation_speeds` of one model: `warmup` untimed generations of the full length, then `repeats` timed
    ones; the new tokens/s of each timed run (`samples`), their `median` and `spread`."""
    return generation_speeds({"model": model}, vocab_size, new_tokens, batch, prompt_len, seed, repeats,
                             warmup)["model"]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _timed(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds of one greedy generation (the device synchronised before and after)."""
    sync = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, greedy=True)
    sync()
    return time.perf_counter() - t0


def generation_tokens_per_s(
    model: torch.nn.Module, vocab_size: int, new_tokens: int = 64, batch: int = 4, prompt_len: int = 16,
    seed: int = 0, repeats: int = 5, warmup: int = 1,
) -> float:
    """Greedy KV-cache generation speed: new tokens per second over a batch of random prompts, the median of
    `repeats` timed runs after `warmup` untimed ones (`generation_speed` also gives the runs and their spread)."""
    return generation_speed(model, vocab_size, new_tokens, batch, prompt_len, seed, repeats, warmup)["median"]
