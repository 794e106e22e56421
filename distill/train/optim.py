"""AdamW over the model's decay groups, with linear warm-up then cosine decay (the `optim` node).

`optim.tile_size` set: `TiledAdamW`, the same update bit for bit with temporaries bounded by the tile. Parameters
laid out on a mesh (DTensors) on CPU: `TiledAdamW` over whole local shards, the update torch's AdamW makes on CPU
(its single-tensor path) without a DTensor dispatch for each of its ~10 ops per parameter.
"""

from __future__ import annotations

import math

import torch

from distill.config import OptimConfig
from distill.losses import is_dtensor
from distill.models import configure_optimizer_groups
from distill.train.tiled_adamw import TiledAdamW

WHOLE = 1 << 62  # a tile no tensor reaches: whole local tensors


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to ``min_ratio`` at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, o: OptimConfig,
                    max_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (tiled when ``o.tile_size`` is set) and its per-step LR schedule."""
    groups = configure_optimizer_groups(model, o.weight_decay)
    opt: torch.optim.Optimizer
    params = [p for g in groups for p in g["params"]]
    local = any(is_dtensor(p) for p in params) and all(p.device.type == "cpu" for p in params)
    if o.tile_size is not None or local:
        tile = o.tile_size if o.tile_size is not None else WHOLE
        opt = TiledAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, tile_size=tile)
    else:
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, o.warmup_steps, max_steps, o.min_lr_ratio)
    )
    return opt, sched
