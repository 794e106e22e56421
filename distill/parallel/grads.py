"""Gradient work that spans the mesh: clipping by the norm of the full model, and the aux-loss-free
balancing counts summed over the data-parallel ranks.

Every rank enters every collective here, in the same order, whatever its data.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


@torch.no_grad()
def total_grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients of the full model (every element counted once, wherever it is held).

    DTensor gradients are grouped by mesh and placements; each group's norm is a DTensor whose
    `full_tensor` reduces exactly over the dimensions it is sharded on (replicas are not counted twice).
    """
    groups: dict[tuple, list[torch.Tensor]] = {}
    plain: list[torch.Tensor] = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            groups.setdefault((id(g.device_mesh), g.placements), []).append(g)
        else:
            plain.append(g)
    squares: list[torch.Tensor] = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        squares.append(norm.full_tensor().float().square())
    if plain:
        squares.append(torch.nn.utils.get_total_norm(plain, 2.0).float().square())
    if not squares:
        return torch.zeros(())
    return torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip like `torch.nn.utils.clip_grad_norm_` on one process holding the whole model; returns the norm."""
    params = [p for p in params if p.grad is not None]
    total = total_grad_norm(params)
    coef = float((max_norm / (total + 1e-6)).clamp(max=1.0))  # one host sync per step, not one per parameter
    if coef < 1.0:  # a factor of 1.0 changes nothing: skip the pass over every gradient
        for p in params:
            p.grad.mul_(coef)
    return total


def balance_count_buffers(root: nn.Module) -> list[torch.Tensor]:
    """The aux-loss-free balancing counts of every MoE router under `root` (routers with a bias only)."""
    from distill.moe import Router

    return [m.balance_counts for m in root.modules() if isinstance(m, Router) and m.balance_bias is not None]


@torch.no_grad()
def all_reduce_balance_counts(root: nn.Module, group: dist.ProcessGroup | None = None, copies: int = 1) -> None:
    """Sum the balancing counts over the ranks (all ranks), so that every rank moves its router bias by the
    global load; `copies` ranks saw each token (the tensor-parallel ranks, which share a micro-batch): the
    sum is divided by it. Entered by every rank."""
    counts = balance_count_buffers(root)
    if counts and dist.is_initialized() and dist.get_world_size(group) > 1:
        flat = torch.cat(counts)
        dist.all_reduce(flat, group=group)
        if copies > 1:
            flat = flat.div(copies, rounding_mode="floor") if not flat.is_floating_point() else flat / copies
        for buf, total in zip(counts, flat.split([c.numel() for c in counts])):
            buf.copy_(total)
