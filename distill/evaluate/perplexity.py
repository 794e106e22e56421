"""Perplexity of a model over every packed block of a split: exp of the mean next-token cross-entropy."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: Any, batch_size: int, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Mean cross-entropy (nats/token) of predicting tokens 1..L of each block [L + 1] from the ones before it,
    over all of ``blocks`` (a dataset of "input_ids" rows, e.g. `LMDataModule.blocks["test"]`), in eval mode and
    in batches of ``batch_size`` blocks (an MoE layer's capacity applies per batch, as in validation).
    Returns {"loss", "ppl", "tokens", "blocks"}."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(blocks), batch_size):
            ids = torch.as_tensor(blocks[start : start + batch_size]["input_ids"], dtype=torch.long).to(device)
            logits = model(ids[:, :-1]).logits
            ce = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
            total += ce.item()
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count, "blocks": len(blocks)}
