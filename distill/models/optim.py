"""Optimizer parameter groups, split nanoGPT style by tensor rank."""

from __future__ import annotations

from typing import Any

import torch.nn as nn


def configure_optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups for `torch.optim.AdamW(groups, ...)`: tensors of rank >= 2 (matmul weights, embeddings,
    stacked expert weights) decay; rank < 2 (biases, norm gains) do not. Frozen parameters are left out;
    tied parameters appear once."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
