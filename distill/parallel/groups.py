"""Which rank holds which experts, and the process groups that connect them (docs/architecture.md).

World size W, expert-parallel size ep (W % ep == 0). A layer with E experts uses an expert-parallel
group of g = min(ep, E) consecutive ranks (g must divide ep and E); rank r holds experts
[p * E/g, (p+1) * E/g) with p = r % g. The ranks with the same p hold the same experts: they form the
layer's expert-data-parallel (EDP) group of W/g ranks, over which the expert gradients are summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from distill.errors import ConfigError


def default_ep_size(processes_per_node: int) -> int:
    """`strategy.ep_size` left null: the processes of one node share each layer's experts."""
    return max(1, processes_per_node)


def check_world(world_size: int, ep_size: int) -> None:
    """ConfigError unless ep_size >= 1 divides the world size (checked before any process group work)."""
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ConfigError("strategy.ep_size", f"must be an integer >= 1, got {ep_size!r}.")
    if world_size % ep_size != 0:
        raise ConfigError(
            "strategy.ep_size",
            f"the world size {world_size} (trainer.devices x trainer.num_nodes) is not divisible by "
            f"strategy.ep_size={ep_size}.",
            f"use an ep_size that divides {world_size}, or change trainer.devices / trainer.num_nodes.",
        )


def layer_group_size(num_experts: int, ep_size: int, what: str = "an MoE layer") -> int:
    """g = min(ep, E) ranks share a layer's experts; ConfigError unless g divides both ep and E."""
    g = min(ep_size, num_experts)
    if ep_size % g != 0 or num_experts % g != 0:
        raise ConfigError(
            "model.num_experts",
            f"{what} has {num_experts} experts, which cannot be split evenly under strategy.ep_size="
            f"{ep_size}: its expert-parallel group would have {g} ranks, and {g} must divide both the "
            f"expert count and ep_size.",
            "use expert counts that are multiples of strategy.ep_size (or divisors of it), or change "
            "strategy.ep_size.",
        )
    return g


@dataclass(frozen=True)
class LayerLayout:
    """Where one MoE layer's experts live, seen from `rank`."""

    num_experts: int
    group_size: int  # g: ranks in this layer's expert-parallel group
    rank: int
    world_size: int

    @property
    def position(self) -> int:
        """This rank's index in its expert-parallel group."""
        return self.rank % self.group_size

    @property
    def num_local(self) -> int:
        return self.num_experts // self.group_size

    @property
    def expert_offset(self) -> int:
        """Global id of this rank's first expert."""
        return self.position * self.num_local

    @property
    def ep_ranks(self) -> list[int]:
        start = self.rank - self.position
        return list(range(start, start + self.group_size))

    @property
    def edp_ranks(self) -> list[int]:
        return list(range(self.position, self.world_size, self.group_size))

    @property
    def replicas(self) -> int:
        """How many ranks hold each of this layer's experts (W / g)."""
        return self.world_size // self.group_size


class ExpertGroups:
    """The process groups of one expert-parallel layout, created on first use per group size.

    `groups(g)` is collective on its first call for a size g: every rank must make it, in the same order
    (the strategy does so at setup for the student, and when the teacher is loaded, at the same step on
    every rank). Groups of one rank are None. Dedicated groups are used even when a group spans the
    world, so expert traffic never shares a process group with DDP's own all-reduces.
    """

    def __init__(self, ep_size: int, rank: int, world_size: int, timeout: timedelta | None = None):
        check_world(world_size, ep_size)
        self.ep_size = ep_size
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self._groups: dict[int, tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]] = {}

    def layout(self, num_experts: int, what: str = "an MoE layer") -> LayerLayout:
        return LayerLayout(num_experts, layer_group_size(num_experts, self.ep_size, what), self.rank, self.world_size)

    def _new_groups(self, blocks: list[list[int]]) -> dist.ProcessGroup | None:
        """Create one group per rank list (every rank calls for every list); return the one holding this rank."""
        mine = None
        for ranks in blocks:
            if len(ranks) == 1:
                continue
            group = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                mine = group
        return mine

    def groups(self, group_size: int) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """(expert-parallel group, expert-data-parallel group) of this rank for layers of group size g."""
        if group_size not in self._groups:
            g, w = group_size, self.world_size
            ep = self._new_groups([list(range(start, start + g)) for start in range(0, w, g)])
            edp = self._new_groups([list(range(p, w, g)) for p in range(g)])
            self._groups[group_size] = (ep, edp)
        return self._groups[group_size]
