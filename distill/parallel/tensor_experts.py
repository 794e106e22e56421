"""Routed experts whose hidden units are split over ``tp`` ("tensor-expert", `distill.parallel.tensor`): the
dispatcher that sums their partial outputs over the tensor-parallel ranks, with or without duplicate token
dropping (DeepSpeed-TED), and the differentiable collectives over ``tp`` it is made of.

Every rank of a tensor-parallel group holds the same rows and back-propagates the same loss, so a
collective's backward follows Megatron's conventions: a sum over ``tp`` in the forward passes the gradient
through unchanged; a copy to every rank sums the gradients of the copies.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from distill.parallel.dispatch import source_to_expert_order
from distill.parallel.vocab import all_reduce_sum

# ------------------------------------------------------------------------------------------ collectives


def _all_gather_rows(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Rows of every rank of `group` (sizes[r] from rank r), concatenated in rank order."""
    width = max(sizes)
    padded = x.new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = x.new_empty((width * len(sizes), *x.shape[1:]))
    dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
    return torch.cat([out[r * width : r * width + n] for r, n in enumerate(sizes)])


def _reduce_scatter_rows(x: torch.Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup) -> torch.Tensor:
    """x [sum(sizes), ...] laid out rank by rank: this rank's block (sizes[rank] rows) summed over `group`."""
    width = max(sizes)
    padded = x.new_zeros((width * len(sizes), *x.shape[1:]))
    start = 0
    for r, n in enumerate(sizes):
        padded[r * width : r * width + n] = x[start : start + n]
        start += n
    out = x.new_empty((width, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, padded, group=group)
    return out[: sizes[rank]]


class _CopyToTP(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over ``tp`` (each rank's expert slice gives part of it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _Shares(NamedTuple):
    """How the rows sorted by expert are split among the ``tp`` ranks: rank r takes, of each expert's rows,
    the r-th of tp nearly equal consecutive parts."""

    mine: torch.Tensor  # this rank's rows (indices into the sorted rows)
    counts: torch.Tensor  # [E] this rank's rows per global expert
    sizes: list[int]  # rows of each rank
    inverse: torch.Tensor  # row i of the sorted rows -> its position in the rank-by-rank concatenation


def _shares(counts: torch.Tensor, tp: int, rank: int) -> _Shares:
    bounds = counts[:, None] * torch.arange(tp + 1, device=counts.device) // tp  # [E, tp + 1]
    per_rank = (bounds[:, 1:] - bounds[:, :-1]).t().contiguous()  # [tp, E]
    starts = counts.cumsum(0) - counts
    total = int(counts.sum())
    index = []
    for r in range(tp):
        c = per_rank[r]
        n = int(c.sum())
        first = torch.repeat_interleave(starts + bounds[:, r], c, output_size=n)
        offset = torch.arange(n, device=counts.device) - torch.repeat_interleave(c.cumsum(0) - c, c, output_size=n)
        index.append(first + offset)
    order = torch.cat(index)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(total, device=order.device)
    return _Shares(index[rank], per_rank[rank], per_rank.sum(1).tolist(), inverse)


class _TakeShare(torch.autograd.Function):
    """This rank's share of rows that every rank of ``tp`` holds alike; the backward gathers every rank's
    share of the gradient back into the whole (replicated) gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shares: _Shares, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.shares, ctx.group = shares, group
        return x.index_select(0, shares.mine)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _gather_shares(grad, ctx.shares, ctx.group), None, None


def _gather_shares(x: torch.Tensor, shares: _Shares, group: dist.ProcessGroup) -> torch.Tensor:
    return _all_gather_rows(x.contiguous(), shares.sizes, group).index_select(0, shares.inverse)


class _GatherShares(torch.autograd.Function):
    """Every rank's share of rows, put back in place (the inverse of `_TakeShare`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, shares: _Shares, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.shares = shares
        return _gather_shares(x, shares, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.index_select(0, ctx.shares.mine), None, None


class _Pool(NamedTuple):
    """The rows the tp ranks received for this rank's experts, pooled expert by expert."""

    sizes: list[int]  # rows each tp rank received
    order: torch.Tensor  # expert-major position -> rank-major position
    inverse: torch.Tensor
    rank: int


class _PoolRows(torch.autograd.Function):
    """All-gather over ``tp`` of the rows each rank received, regrouped by local expert; the backward
    reduce-scatters (each rank's expert slice gives part of every row's gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pool: _Pool, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.pool, ctx.group = pool, group
        return _all_gather_rows(x.contiguous(), pool.sizes, group).index_select(0, pool.order)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        pool = ctx.pool
        return _reduce_scatter_rows(grad.index_select(0, pool.inverse), pool.sizes, pool.rank, ctx.group), None, None


class _UnpoolRows(torch.autograd.Function):
    """The experts' partial outputs for the pooled rows, summed over ``tp``, each rank keeping the rows it
    received (the inverse of `_PoolRows`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pool: _Pool, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.pool, ctx.group = pool, group
        return _reduce_scatter_rows(x.index_select(0, pool.inverse), pool.sizes, pool.rank, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        pool = ctx.pool
        return _all_gather_rows(grad.contiguous(), pool.sizes, ctx.group).index_select(0, pool.order), None, None


# ------------------------------------------------------------------------------------------ experts


class TensorExpertDispatcher:
    """Dispatch for experts whose hidden units are split over ``tp`` (a `TokenDispatcher`), around the layer's
    expert-parallel dispatcher `inner` (flat, hierarchical or local), which runs among the ranks of the same
    tp index.

    Without dropping, every tp rank sends all its rows through `inner`; the experts' partial outputs are
    summed over ``tp`` before the combine. With `drop_duplicate_tokens` (DeepSpeed-TED), the rows being the
    same on every tp rank, each sends only its share (1/tp of each expert's rows) through `inner`; the rows
    received are pooled over ``tp`` (all-gather) for the experts, their outputs summed back into each rank's
    share (reduce-scatter), and after the combine an all-gather over ``tp`` restores every row.
    """

    def __init__(self, inner: Any, group: dist.ProcessGroup, drop_duplicate_tokens: bool, traffic: Any = None):
        self.inner, self.group, self.drop = inner, group, drop_duplicate_tokens
        self.tp = dist.get_world_size(group)
        self.rank = dist.get_group_rank(group, dist.get_rank())
        self.traffic = traffic

    def _count(self, kind: str, rows: int, row: torch.Tensor) -> None:
        if self.traffic is not None:
            self.traffic.count(kind, rows * row[0].numel() * row.element_size() if len(row) else 0)

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        if not self.drop:
            rows, local_counts, handle = self.inner.dispatch(_CopyToTP.apply(tokens, self.group), counts)
            return rows, local_counts, (handle, None, None)
        shares = _shares(counts, self.tp, self.rank)
        mine = _TakeShare.apply(tokens, shares, self.group)
        rows, local_counts, handle = self.inner.dispatch(mine, shares.counts)
        every = local_counts.new_empty(self.tp * local_counts.numel())
        dist.all_gather_into_tensor(every, local_counts.contiguous(), group=self.group)
        every = every.view(self.tp, -1)
        sizes = every.sum(1).tolist()
        order = source_to_expert_order(every, sum(sizes))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        pool = _Pool(sizes, order, inverse, self.rank)
        self._count("tp_all_gather", sum(sizes) - sizes[self.rank], tokens)
        return _PoolRows.apply(rows, pool, self.group), every.sum(0), (handle, shares, pool)

    def combine(self, expert_out: torch.Tensor, handle: Any) -> torch.Tensor:
        inner_handle, shares, pool = handle
        if shares is None:
            self._count("tp_all_reduce", expert_out.shape[0], expert_out)
            return self.inner.combine(all_reduce_sum(expert_out, self.group), inner_handle)
        mine = self.inner.combine(_UnpoolRows.apply(expert_out, pool, self.group), inner_handle)
        self._count("tp_reduce_scatter", sum(pool.sizes) - pool.sizes[self.rank], expert_out)
        self._count("tp_all_gather", sum(shares.sizes) - shares.sizes[self.rank], mine)
        return _GatherShares.apply(mine, shares, self.group)
