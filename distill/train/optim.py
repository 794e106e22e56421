"""AdamW over the model's decay groups, with linear warm-up then cosine decay (the `optim` node).

Which AdamW, decided here (`build_optimizer`):

- `optim.tile_size` set: `TiledAdamW`, the same update as torch's single-tensor AdamW bit for bit, with
  temporaries bounded by the tile;
- parameters on CPU: torch's fused AdamW (`fused=True`: one vectorised pass over each tensor, plain or DTensor,
  instead of the single-tensor path's ten passes and two parameter-sized temporaries; 4x faster on one thread,
  12x on two). Not under Lightning's mixed-precision plugin, which refuses to clip the gradients of a fused
  optimizer (it may unscale them itself): there the single-tensor update, on DTensors as `TiledAdamW` over
  whole local shards (no DTensor dispatch for each of its ~10 ops per parameter);
- elsewhere (accelerators): torch's AdamW with its defaults.
"""

from __future__ import annotations

import math
from typing import Any

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


def build_optimizer(model: torch.nn.Module, o: OptimConfig, max_steps: int, fused: bool = True
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (module docstring: which one; `fused=False` rules out the fused step) and its per-step LR schedule."""
    groups = configure_optimizer_groups(model, o.weight_decay)
    opt: torch.optim.Optimizer
    params = [p for g in groups for p in g["params"]]
    cpu = all(p.device.type == "cpu" for p in params)
    hp = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if o.tile_size is not None:
        opt = TiledAdamW(groups, **hp, tile_size=o.tile_size)
    elif cpu and fused:
        opt = torch.optim.AdamW(groups, **hp, fused=True)
    elif cpu and any(is_dtensor(p) for p in params):
        opt = TiledAdamW(groups, **hp, tile_size=WHOLE)
    else:
        opt = torch.optim.AdamW(groups, **hp)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, o.warmup_steps, max_steps, o.min_lr_ratio)
    )
    return opt, sched


def lightning_optimizers(module: Any, trained: torch.nn.Module, o: OptimConfig, max_steps: int) -> dict[str, Any]:
    """`configure_optimizers`' answer for a LightningModule training `trained`: `build_optimizer`, fused unless
    the trainer's precision plugin is the mixed-precision one, with the schedule stepped every step."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    trainer = getattr(module, "_trainer", None)
    amp = trainer is not None and isinstance(trainer.precision_plugin, MixedPrecision)
    opt, sched = build_optimizer(trained, o, max_steps, fused=not amp)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
