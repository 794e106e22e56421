"""Expert parallelism: process groups, all-to-all token dispatch, expert sharding and checkpoint
conversion, and the Lightning strategy that applies them (DESIGN.md, "Expert parallelism").

The strategy (and with it Lightning) is imported on first use, so the pieces load with torch alone.
"""

from typing import Any

from distill.parallel.dispatch import AllToAllDispatcher, CommTimer
from distill.parallel.groups import ExpertGroups, LayerLayout, check_world, layer_group_size
from distill.parallel.shard import (
    ExpertShard,
    broadcast_expert_replicas,
    clip_grad_norm_expert_parallel,
    consolidate_optimizer_state,
    consolidate_state_dict,
    ddp_ignore_experts,
    reduce_expert_grads,
    shard_experts,
    slice_optimizer_state,
    slice_state_dict,
    unshard_experts,
)

__all__ = [
    "AllToAllDispatcher",
    "CommTimer",
    "ExpertGroups",
    "ExpertParallelStrategy",
    "ExpertShard",
    "LayerLayout",
    "broadcast_expert_replicas",
    "check_world",
    "clip_grad_norm_expert_parallel",
    "consolidate_optimizer_state",
    "consolidate_state_dict",
    "ddp_ignore_experts",
    "layer_group_size",
    "reduce_expert_grads",
    "register_expert_parallel",
    "shard_experts",
    "slice_optimizer_state",
    "slice_state_dict",
    "unshard_experts",
]


def __getattr__(name: str) -> Any:
    if name in ("ExpertParallelStrategy", "register_expert_parallel"):
        from distill.parallel import strategy

        return getattr(strategy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
