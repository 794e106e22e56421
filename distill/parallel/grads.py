"""Gradients of expert-sharded layers: the reduction over the expert-data-parallel groups and clipping by
the norm of the full model (the layers were sharded by `distill.parallel.shard.shard_experts`).

Every rank of a group enters every collective of that group, in the same order, whatever its data
(missing gradients count as zeros), or a rank waits forever.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from distill.parallel.shard import ExpertShard


@torch.no_grad()
def reduce_expert_grads(shards: Iterable[ExpertShard], world_size: int) -> None:
    """Sum expert gradients over each expert-data-parallel group, then divide by the world size.

    Each rank's gradient already sums the contributions of every rank of its expert-parallel group (the
    all-to-all backward brings them home), so the result equals data parallelism with replicated experts,
    where DDP averages over all W ranks. One flat all-reduce per group (and dtype); missing gradients
    count as zeros so that every rank enters every all-reduce.
    """
    buckets: dict[tuple[int, torch.dtype], tuple[dist.ProcessGroup | None, list[nn.Parameter]]] = {}
    for s in shards:
        for _, p in s.named_parameters():
            if p.requires_grad:
                buckets.setdefault((s.layout.group_size, p.dtype), (s.edp_group, []))[1].append(p)
    for group, params in buckets.values():
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in params])
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat /= world_size
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))


@torch.no_grad()
def clip_grad_norm_expert_parallel(
    params: Iterable[torch.Tensor], max_norm: float, shards: Iterable[ExpertShard], world_size: int
) -> torch.Tensor:
    """Clip gradients by the global norm of the full model (each expert counted once), like
    `torch.nn.utils.clip_grad_norm_` on one process holding everything; returns that norm.

    Non-expert gradients are equal on every rank (DDP); a layer's experts are spread over g ranks and
    each is held by W/g ranks, so weighting local expert squares by g/W and summing over the world
    counts each expert once. One all-reduce (a scalar) per call, entered by every rank.
    """
    params = [p for p in params if p.grad is not None]
    weight = {id(p): s.layout.group_size / world_size for s in shards for _, p in s.named_parameters()}
    device = params[0].grad.device if params else torch.device("cpu")
    dense_sq = torch.zeros((), device=device)
    expert_sq = torch.zeros((), device=device)
    for p in params:
        sq = p.grad.detach().float().square().sum()
        if id(p) in weight:
            expert_sq += weight[id(p)] * sq
        else:
            dense_sq += sq
    if world_size > 1:
        dist.all_reduce(expert_sq)
    total = (dense_sq + expert_sq).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
