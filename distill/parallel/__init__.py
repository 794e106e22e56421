"""Expert parallelism: process groups, all-to-all token dispatch, expert sharding, gradient reduction and
checkpoint conversion, and the Lightning strategy that applies them (docs/architecture.md; usage in
README.md, "Expert parallelism"). The other pieces are imported from their modules (groups, dispatch,
shard, grads, launch).

The strategy (and with it Lightning) is imported on first use, so the pieces load with torch alone.
Select it with the Hydra config `strategy=expert_parallel` or pass an `ExpertParallelStrategy` to the
Trainer; it is not registered under a name in Lightning's StrategyRegistry.
"""

from typing import Any

from distill.parallel.dispatch import CommTimer
from distill.parallel.grads import clip_grad_norm_expert_parallel, reduce_expert_grads
from distill.parallel.groups import ExpertGroups
from distill.parallel.shard import ddp_ignore_experts, shard_experts

__all__ = [
    "CommTimer",
    "ExpertGroups",
    "ExpertParallelStrategy",
    "clip_grad_norm_expert_parallel",
    "ddp_ignore_experts",
    "reduce_expert_grads",
    "shard_experts",
]


def __getattr__(name: str) -> Any:
    if name == "ExpertParallelStrategy":
        from distill.parallel.strategy import ExpertParallelStrategy

        return ExpertParallelStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
