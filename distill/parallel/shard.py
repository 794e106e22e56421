"""Expert sharding applied from outside the model: slice every MoE layer's experts, swap in the all-to-all
dispatcher, keep the experts out of DDP, and convert state dicts (model and optimizer) between the
sharded layout and the full, layout-independent one (the expert gradients: `distill.parallel.grads`).

Collectives here follow one rule, or a rank waits forever: every rank of a group enters every
collective of that group, in the same order, whatever its data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distill.moe import GroupedExperts, LocalDispatcher, MoELayer
from distill.parallel.dispatch import AllToAllDispatcher, CommTimer
from distill.parallel.groups import ExpertGroups, LayerLayout, layer_group_size


@dataclass
class ExpertShard:
    """One MoE layer as this rank holds it: `name` is its module path under the root that was sharded."""

    name: str
    layer: MoELayer
    layout: LayerLayout
    ep_group: dist.ProcessGroup | None
    edp_group: dist.ProcessGroup | None

    @property
    def experts(self) -> GroupedExperts:
        return self.layer.experts

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(fully qualified name under the sharded root, parameter) of this layer's experts."""
        prefix = f"{self.name}.experts." if self.name else "experts."
        return [(prefix + n, p) for n, p in self.experts.named_parameters()]


def moe_layers(root: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in root.named_modules() if isinstance(m, MoELayer)]


def check_moe_layers(root: nn.Module, ep_size: int, what: str = "an MoE layer") -> None:
    """ConfigError for the first MoE layer of `root` whose experts cannot be split under `ep_size`."""
    for _, layer in moe_layers(root):
        layer_group_size(layer.num_experts, ep_size, what)


def _set_experts(experts: GroupedExperts, tensors: dict[str, torch.Tensor], offset: int) -> None:
    for pname, t in tensors.items():
        requires_grad = getattr(experts, pname).requires_grad
        setattr(experts, pname, nn.Parameter(t, requires_grad=requires_grad))
    experts.expert_offset = offset


def shard_experts(
    root: nn.Module, groups: ExpertGroups, timer: CommTimer | None = None, what: str = "an MoE layer"
) -> list[ExpertShard]:
    """Keep this rank's slice of every MoE layer's experts and give each layer an all-to-all dispatcher.

    Idempotent: a layer already holding exactly its slice is left as it is. Every layer is checked
    before any process group is created, so a bad layout fails with a ConfigError on every rank alike.
    """
    layers = [(name, layer, groups.layout(layer.num_experts, what)) for name, layer in moe_layers(root)]
    shards = []
    for name, layer, layout in layers:
        ep_group, edp_group = groups.groups(layout.group_size)
        experts = layer.experts
        held = (experts.expert_offset, experts.num_local_experts)
        if held != (layout.expert_offset, layout.num_local):
            if held != (0, layout.num_experts):
                raise RuntimeError(f"{name}: holds experts {held}, cannot take the slice of layout {layout}.")
            with torch.no_grad():
                local = {
                    pname: p[layout.expert_offset : layout.expert_offset + layout.num_local].clone()
                    for pname, p in experts.named_parameters()
                }
            _set_experts(experts, local, layout.expert_offset)
        layer.dispatcher = (
            AllToAllDispatcher(ep_group, layout.group_size, layout.num_local, timer)
            if ep_group is not None
            else LocalDispatcher()
        )
        shards.append(ExpertShard(name, layer, layout, ep_group, edp_group))
    return shards


def balance_count_buffers(root: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) of the aux-loss-free balancing counts of every MoE router under `root`."""
    return [
        (f"{name}.router.balance_counts" if name else "router.balance_counts", layer.router.balance_counts)
        for name, layer in moe_layers(root)
        if layer.router.balance_bias is not None
    ]


@torch.no_grad()
def all_reduce_balance_counts(root: nn.Module) -> None:
    """Sum the balancing counts over all ranks, so that every rank moves its router bias by the global
    load (the layers update the bias before the optimizer step). Entered by every rank."""
    counts = [buf for _, buf in balance_count_buffers(root)]
    if counts:
        flat = torch.cat(counts)
        dist.all_reduce(flat)
        for buf, total in zip(counts, flat.split([c.numel() for c in counts])):
            buf.copy_(total)


def ddp_ignore_experts(module: nn.Module, shards: Iterable[ExpertShard]) -> None:
    """Keep the expert parameters of `module` (the root the shards were made from) out of DDP's
    broadcast and all-reduce; call before wrapping it in DistributedDataParallel. The routers' balancing
    counts are kept out too: DDP would overwrite them with rank 0's at every forward (they are summed
    over ranks by `all_reduce_balance_counts` instead)."""
    names = {name for s in shards for name, _ in s.named_parameters()}
    names |= {name for name, _ in balance_count_buffers(module)}
    names |= set(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(names))


@torch.no_grad()
def unshard_experts(shards: Iterable[ExpertShard]) -> None:
    """Gather every layer's full experts onto every rank of its group and restore the local dispatcher."""
    for s in shards:
        if s.ep_group is not None:
            full = {pname: _all_gather_cat(p.detach(), s) for pname, p in s.experts.named_parameters()}
            _set_experts(s.experts, full, 0)
        s.layer.dispatcher = LocalDispatcher()


def _all_gather_cat(t: torch.Tensor, s: ExpertShard) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(s.layout.group_size)]
    dist.all_gather(parts, t.contiguous(), group=s.ep_group)
    return torch.cat(parts)


@torch.no_grad()
def broadcast_expert_replicas(shards: Iterable[ExpertShard]) -> None:
    """Make the ranks holding the same experts hold the same values (as DDP does for the other parameters)."""
    for s in shards:
        if s.edp_group is not None:
            for p in s.experts.parameters():
                dist.broadcast(p.data, src=s.layout.edp_ranks[0], group=s.edp_group)


# ----------------------------------------------------------------------------------------------------
# checkpoints: full, layout-independent tensors on disk; local slices in memory


def _gather_to_first(t: torch.Tensor, s: ExpertShard) -> torch.Tensor:
    """Full [E, ...] tensor on the group's first rank (others get their own slice back)."""
    dst = s.layout.ep_ranks[0]
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(s.layout.group_size)] if s.layout.rank == dst else None
    dist.gather(t, parts, dst=dst, group=s.ep_group)
    return torch.cat(parts) if parts is not None else t


def _gathering(shards: Iterable[ExpertShard]) -> list[ExpertShard]:
    """The sharded layers whose expert-parallel group contains global rank 0 (the rank that writes)."""
    return [s for s in shards if s.ep_group is not None and s.layout.ep_ranks[0] == 0]


def consolidate_state_dict(state: dict[str, Any], shards: Iterable[ExpertShard]) -> dict[str, Any]:
    """The state dict with full expert tensors on global rank 0, as a one-process run would save it.

    Only the ranks of rank 0's expert-parallel group take part (a gather per expert tensor); the other
    ranks' results keep their slices and are not written.
    """
    state = dict(state)
    for s in _gathering(shards):
        for key, _ in s.named_parameters():
            state[key] = _gather_to_first(state[key], s)
    return state


def _local_slice(t: torch.Tensor, layout: LayerLayout, what: str) -> torch.Tensor:
    if t.shape[0] != layout.num_experts:
        raise ValueError(
            f"{what}: expected the full {layout.num_experts} experts along dim 0, found shape {tuple(t.shape)}."
        )
    return t[layout.expert_offset : layout.expert_offset + layout.num_local]


def slice_state_dict(state: Mapping[str, Any], shards: Iterable[ExpertShard]) -> dict[str, Any]:
    """A full (layout-independent) state dict cut down to this rank's experts."""
    state = dict(state)
    for s in shards:
        for key, _ in s.named_parameters():
            if key in state:
                state[key] = _local_slice(state[key], s.layout, key)
    return state


def _param_indices(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(parameter) -> its index in `optimizer.state_dict()` (params numbered in param-group order)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p): i for i, p in enumerate(params)}


def _expert_states(optimizer: torch.optim.Optimizer, shards: Iterable[ExpertShard]):
    index = _param_indices(optimizer)
    for s in shards:
        for name, p in s.named_parameters():
            if id(p) in index:
                yield s, name, p, index[id(p)]


def consolidate_optimizer_state(
    osd: dict[str, Any], optimizer: torch.optim.Optimizer, shards: Iterable[ExpertShard]
) -> dict[str, Any]:
    """`optimizer.state_dict()` with every per-element state of an expert parameter (AdamW's exp_avg and
    exp_avg_sq) gathered to full [E, ...] tensors on global rank 0; scalar states (step) are kept."""
    state = dict(osd["state"])
    for s, _, p, i in _expert_states(optimizer, _gathering(shards)):
        if i in state:
            state[i] = {
                k: _gather_to_first(v, s) if torch.is_tensor(v) and v.shape == p.shape else v
                for k, v in sorted(state[i].items())
            }
    return {**osd, "state": state}


def slice_optimizer_state(
    osd: Mapping[str, Any], optimizer: torch.optim.Optimizer, shards: Iterable[ExpertShard]
) -> dict[str, Any]:
    """A full optimizer state dict (as `consolidate_optimizer_state` or a one-process run saves it) cut
    down to this rank's experts."""
    state = dict(osd["state"])
    for s, name, p, i in _expert_states(optimizer, shards):
        if i in state:
            full_shape = (s.layout.num_experts, *p.shape[1:])
            state[i] = {
                k: _local_slice(v, s.layout, f"optimizer state {k} of {name}")
                if torch.is_tensor(v) and v.shape == full_shape
                else v
                for k, v in state[i].items()
            }
    return {**osd, "state": state}
