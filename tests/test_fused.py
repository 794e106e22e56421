"""The fused projections' interleaved layout (distill/models/fused.py) and its lazy reader."""

from __future__ import annotations

import pytest
import torch

from distill.models.fused import deinterleave, interleave
from distill.parallel.load import Interleaved, Loaded


def naive_interleave(parts: list[torch.Tensor], sizes: tuple[int, ...]) -> torch.Tensor:
    """Group g of every part in turn, by a loop (the reference)."""
    groups = parts[0].shape[0] // sizes[0]
    return torch.cat([p[g * s : (g + 1) * s] for g in range(groups) for p, s in zip(parts, sizes)])


@pytest.mark.parametrize("sizes", [(4, 2, 2), (1, 1), (3, 1, 1)])
def test_interleave_matches_a_loop_and_deinterleave_inverts_it(sizes):
    torch.manual_seed(0)
    parts = [torch.randn(3 * s, 5) for s in sizes]
    fused = interleave(parts, sizes)
    assert torch.equal(fused, naive_interleave(parts, sizes))
    assert all(torch.equal(a, b) for a, b in zip(deinterleave(fused, sizes), parts))
    moved = interleave([p.T for p in parts], sizes, dim=1)  # along another dim
    assert torch.equal(moved, fused.T)


@pytest.mark.parametrize("sizes", [(4, 2, 2), (1, 1)])
def test_lazy_interleaved_reads_exactly_the_region(sizes):
    """Every region (group-aligned or not: FSDP cuts anywhere) equals the eager tensor's, and reads no element
    outside it."""
    torch.manual_seed(0)
    parts = [torch.randn(3 * s, 5) for s in sizes]
    fused = interleave(parts, sizes)
    reads: list[int] = []

    class Counting(Loaded):
        def read(self, index):
            out = super().read(index)
            reads.append(out.numel())
            return out

    lazy = Interleaved([Counting(p) for p in parts], sizes)
    assert lazy.shape == tuple(fused.shape)
    n = fused.shape[0]
    for lo in range(n + 1):
        for hi in range(lo, n + 1):
            reads.clear()
            assert torch.equal(lazy.read((slice(lo, hi), slice(1, 4))), fused[lo:hi, 1:4]), (lo, hi)
            assert sum(reads) == (hi - lo) * 3, (lo, hi, reads)


def test_interleave_rejects_parts_with_different_group_counts():
    with pytest.raises(ValueError, match="same number of groups"):
        interleave([torch.zeros(4, 2), torch.zeros(3, 2)], (2, 1))
