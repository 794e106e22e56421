"""Evaluation: generation speed (used by the pipeline's report) and `python -m distill.evaluate`.

`python -m distill.evaluate eval.model=<export dir or .ckpt>` (distill/evaluate/__main__.py) measures the
perplexity of a model on the test and validation splits and runs lm-evaluation-harness tasks on it
(`distill.evaluate.harness`), the project's own multiple-choice task included (`distill.eval_tasks`).
"""

from __future__ import annotations

import time

import torch


@torch.no_grad()
def generation_tokens_per_s(
    model: torch.nn.Module, vocab_size: int, new_tokens: int = 64, batch: int = 4, prompt_len: int = 16,
    seed: int = 0,
) -> float:
    """Greedy KV-cache generation speed: new tokens per second over a batch of random prompts."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (batch, prompt_len), generator=g).to(device)
    model.generate(prompt, max_new_tokens=2, greedy=True)  # warm-up
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, greedy=True)
    dt = time.perf_counter() - t0
    model.train(was_training)
    return batch * new_tokens / dt
