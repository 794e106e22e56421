"""All-to-all token dispatch for expert parallelism (the `TokenDispatcher` of `distill.moe.dispatch`).

The MoE layer hands over its (token, choice) rows sorted by global expert. Experts are laid out in
rank order inside the layer's expert-parallel group, so rows are already grouped by destination rank:

1. exchange the row counts per (destination rank, local expert) with one small all-to-all;
2. send the rows with a differentiable all-to-all of uneven splits (its backward is the reverse
   all-to-all, which every rank enters even when it received nothing);
3. regroup the received rows (source-major) by local expert (expert-major) for the grouped experts;
4. `combine` undoes 3 and 2.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


class CommTimer:
    """Wall time spent inside the dispatcher's collectives (forward and backward), when `enabled`.

    On accelerators the device is synchronised around each collective so that the time is its own.
    """

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def run(self, fn: Any, device: torch.device) -> None:
        if not self.enabled:
            fn()
            return
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        self.seconds += time.perf_counter() - t0
        self.calls += 1


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup,
               timer: CommTimer | None, differentiable: bool = True) -> torch.Tensor:
    """Rows of `x` (in_splits[i] of them for group rank i) -> rows received (out_splits[i] from rank i), with
    the functional collective (`all_to_all_single_autograd`: its backward is the reverse all-to-all, which
    every rank enters even when it received nothing)."""
    fn = funcol.all_to_all_single_autograd if differentiable else funcol.all_to_all_single
    result: list[torch.Tensor] = []
    call = lambda: result.append(funcol.wait_tensor(fn(x.contiguous(), out_splits, in_splits, group)))  # noqa: E731
    if timer is None:
        call()
    else:
        timer.run(call, x.device)
    return result[0]


def source_to_expert_order(recv_counts: torch.Tensor, total: int) -> torch.Tensor:
    """Index that reorders rows received source-major (recv_counts [g, E_local]: rows from source s for
    local expert l, stored s by s) into expert-major order (l by l; sources in rank order within l)."""
    flat = recv_counts.flatten()
    starts = (flat.cumsum(0) - flat).view_as(recv_counts).t().flatten()  # chunk starts, expert-major
    counts = recv_counts.t().flatten()
    chunk_start = torch.repeat_interleave(starts, counts, output_size=total)
    offset_in_chunk = torch.arange(total, device=flat.device) - torch.repeat_interleave(
        counts.cumsum(0) - counts, counts, output_size=total
    )
    return chunk_start + offset_in_chunk


class _Permute(torch.autograd.Function):
    """x[index] for a permutation `index`; the backward gathers with the inverse permutation (plain
    index_select's backward scatter-adds, which is slow on CPU)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _Handle(NamedTuple):
    order: torch.Tensor  # expert-major position -> source-major position
    inverse: torch.Tensor  # source-major position -> expert-major position
    send_splits: list[int]
    recv_splits: list[int]


class AllToAllDispatcher:
    """Sends each (token, choice) row to the rank of its expert and brings the outputs back.

    `group` is the layer's expert-parallel group of `group_size` ranks, each holding `num_local`
    consecutive experts in rank order.
    """

    def __init__(self, group: dist.ProcessGroup, group_size: int, num_local: int, timer: CommTimer | None = None,
                 traffic: Any = None):
        self.group = group
        self.group_size = group_size
        self.num_local = num_local
        self.timer = timer
        self.traffic = traffic  # a `distill.parallel.hierarchical.Traffic` counting what crosses nodes, or None
        self.pos = dist.get_group_rank(group, dist.get_rank())

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, _Handle]:
        send_counts = counts.view(self.group_size, self.num_local).contiguous()
        ones = [1] * self.group_size  # row i: the counts for group rank i's experts
        recv_counts = all_to_all(send_counts, ones, ones, self.group, self.timer, differentiable=False)
        send_splits, recv_splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # one host read
        if self.traffic is not None:
            self.traffic.add_flat(send_splits, self.pos, tokens[0].numel() * tokens.element_size() if len(tokens) else 0)
        received = all_to_all(tokens, recv_splits, send_splits, self.group, self.timer)
        order = source_to_expert_order(recv_counts, sum(recv_splits))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        rows = _Permute.apply(received, order, inverse)
        return rows, recv_counts.sum(0), _Handle(order, inverse, send_splits, recv_splits)

    def combine(self, expert_out: torch.Tensor, handle: _Handle) -> torch.Tensor:
        back = _Permute.apply(expert_out, handle.inverse, handle.order)  # source-major again
        return all_to_all(back, handle.send_splits, handle.recv_splits, self.group, self.timer)
