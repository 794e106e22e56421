"""Hierarchical all-to-all (DeepSpeed-MoE): the expert-parallel group of g = I x J ranks laid out as I nodes
of J consecutive ranks (`parallel.ep_intra` = J); rows are exchanged within a node first, then across nodes,
with the same result as the flat all-to-all of `distill.parallel.dispatch.AllToAllDispatcher`.

Rank p = (n, j) = n * J + j. Its rows arrive sorted by destination rank, each destination's rows grouped by
local expert.

1. Within node n (J ranks): rank (n, j) sends to (n, j') the rows for every (m, j'), ordered by m.
2. Across nodes (I ranks with the same j): rank (n, j) now holds, from each (n, j''), the rows for every
   (m, j), ordered [j''][m]; it regroups them [m][j''] and sends node m its part.
3. Rank (n, j) receives from each node m' the rows of the sources (m', j'') in that order: source-major
   (s = m' * J + j''), which is what the flat exchange delivers; the expert regrouping is the flat one's.

A message crossing the node boundary then carries what J flat messages carried: I - 1 messages per rank
instead of (I - 1) * J, the same bytes. `combine` runs the steps backwards. The row counts of the whole
group are gathered first (g x g x E_local integers).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from distill.parallel.dispatch import CommTimer, _Permute, all_to_all, source_to_expert_order


class Traffic:
    """Messages and bytes this rank sends to ranks of other nodes, nodes being `ranks_per_node` consecutive
    ranks of an expert-parallel group (a simulated node boundary: the bench counts flat and hierarchical
    exchanges with it)."""

    def __init__(self, ranks_per_node: int) -> None:
        self.ranks_per_node = ranks_per_node
        self.messages = 0
        self.bytes = 0
        self.other: dict[str, int] = {}  # bytes received or sent by other collectives, by kind (tensor parallelism)

    def count(self, kind: str, nbytes: int) -> None:
        self.other[kind] = self.other.get(kind, 0) + nbytes

    def add_flat(self, splits: list[int], pos: int, row_bytes: int) -> None:
        """A flat exchange from group rank `pos`: splits[d] rows to group rank d."""
        J = self.ranks_per_node
        self.add(splits, [d // J != pos // J for d in range(len(splits))], row_bytes)

    def add(self, splits: list[int], remote: list[bool], row_bytes: int) -> None:
        self.messages += sum(1 for n, r in zip(splits, remote) if r and n)
        self.bytes += sum(n for n, r in zip(splits, remote) if r) * row_bytes


def _perm(sizes: torch.Tensor, order: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Index (on `device`) that reads the chunks of a buffer laid out row-major as `sizes` [A, B] in the order
    `order`."""
    sizes = sizes.cpu()  # on the host already (the dispatcher reads the counts once)
    starts = (sizes.flatten().cumsum(0) - sizes.flatten()).view_as(sizes)
    parts = [torch.arange(int(starts[a, b]), int(starts[a, b] + sizes[a, b])) for a, b in order]
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(device)


def _inverse(index: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(index)
    inv[index] = torch.arange(index.numel(), device=index.device)
    return inv


class _Handle(NamedTuple):
    steps: list[Any]  # (perm, inverse, send_splits, recv_splits, group, remote) per stage, in order
    order: torch.Tensor
    inverse: torch.Tensor


class HierarchicalAllToAllDispatcher:
    """Dispatch over `group` (g = nodes x ranks_per_node consecutive ranks) through `intra` then `inter`."""

    def __init__(self, group: dist.ProcessGroup, intra: dist.ProcessGroup, inter: dist.ProcessGroup,
                 nodes: int, ranks_per_node: int, num_local: int, timer: CommTimer | None = None,
                 traffic: Traffic | None = None):
        self.group, self.intra, self.inter = group, intra, inter
        self.nodes, self.J, self.num_local = nodes, ranks_per_node, num_local
        self.timer, self.traffic = timer, traffic
        self.pos = dist.get_group_rank(group, dist.get_rank())

    def _counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        g = self.nodes * self.J
        out = send_counts.new_empty(g * g * self.num_local)
        dist.all_gather_into_tensor(out, send_counts.flatten().contiguous(), group=self.group)
        return out.view(g, g, self.num_local)  # [source, destination, local expert]

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, _Handle]:
        I, J = self.nodes, self.J  # noqa: E741 (the paper's names: I nodes of J ranks)
        n, j = divmod(self.pos, J)
        C = self._counts(counts.view(I * J, self.num_local))
        rows = C.sum(2).cpu()  # [source, destination] rows: the one host read of the counts
        mine = rows[self.pos].view(I, J)  # my rows per destination (m, j')
        # stage 1, within the node: to (n, j') the rows for (m, j'), m = 0..I-1
        perm1 = _perm(mine, [(m, jj) for jj in range(J) for m in range(I)], tokens.device)
        send1 = mine.sum(0).tolist()
        got1 = torch.stack([rows[n * J + jj].view(I, J)[:, j] for jj in range(J)])  # [j''][m] received sizes
        recv1 = got1.sum(1).tolist()
        # stage 2, across nodes: regroup [j''][m] -> [m][j''], to node m its part
        perm2 = _perm(got1, [(jj, m) for m in range(I) for jj in range(J)], tokens.device)
        send2 = got1.sum(0).tolist()
        recv2 = [int(rows[mm * J : (mm + 1) * J, self.pos].sum()) for mm in range(I)]
        steps = [(perm1, _inverse(perm1), send1, recv1, self.intra, [False] * J),
                 (perm2, _inverse(perm2), send2, recv2, self.inter, [mm != n for mm in range(I)])]
        x = tokens
        for perm, inv, send, recv, group, remote in steps:
            x = _Permute.apply(x, perm, inv)
            if self.traffic is not None:
                self.traffic.add(send, remote, x[0].numel() * x.element_size() if len(x) else 0)
            x = all_to_all(x, recv, send, group, self.timer)
        recv_counts = C[:, self.pos, :]  # [source, local expert], sources in rank order
        order = source_to_expert_order(recv_counts, x.shape[0])
        inverse = _inverse(order)
        return _Permute.apply(x, order, inverse), recv_counts.sum(0), _Handle(steps, order, inverse)

    def combine(self, expert_out: torch.Tensor, handle: _Handle) -> torch.Tensor:
        x = _Permute.apply(expert_out, handle.inverse, handle.order)  # source-major again
        for perm, inv, send, recv, group, _ in reversed(handle.steps):
            x = all_to_all(x, send, recv, group, self.timer)
            x = _Permute.apply(x, inv, perm)
        return x
