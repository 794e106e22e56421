"""Vocabulary-parallel losses: logits sharded on the vocabulary over a 1-D tensor-parallel mesh.

With a column-parallel LM head the logits are a DTensor [..., V] placed `(Shard(-1),)` on the tp mesh:
rank r holds a contiguous slice of the vocabulary (torch.chunk's split, so the last slices may be
shorter or empty). Every tp rank holds the same tokens and computes the same loss. The reductions over
the vocabulary (max, sum of exp, a weighted sum, the target's logit) are taken on the local slice and
all-reduced as one scalar per token; no rank ever holds full-vocabulary logits.

Gradients follow Megatron's tensor-parallel convention: the loss is replicated, every tp rank
back-propagates the same upstream gradient, so a sum all-reduce is the identity in the backward pass
and each rank's gradient lands on its own slice (through the differentiable `DTensor.to_local`).
Every rank enters every collective here, in the same order: the tokens (and masks) must be the same
on all tp ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


def vocab_sharded(logits: torch.Tensor) -> bool:
    """True for a DTensor sharded on its last (vocabulary) dim over a 1-D mesh; False for a plain tensor.

    Raises ValueError for any other DTensor (replicated, sharded on another dim, or on a mesh of more
    than one dimension): no loss here can take it without gathering the vocabulary.
    """
    if not isinstance(logits, DTensor):
        return False
    mesh, placements = logits.device_mesh, logits.placements
    last = logits.ndim - 1
    if mesh.ndim == 1 and isinstance(placements[0], Shard) and placements[0].dim in (-1, last):
        return True
    raise ValueError(
        "vocabulary-parallel losses take logits sharded on the vocabulary, placements (Shard(-1),) on a "
        f"1-D tensor-parallel mesh; got placements {tuple(placements)} on a mesh of shape {tuple(mesh.shape)} "
        f"(logits of shape {tuple(logits.shape)}). Lay the LM head out column-parallel on the tp mesh alone, "
        "or pass logits.full_tensor()."
    )


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the backward pass is the identity (the loss is replicated over the group)."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable sum over `group` with the tensor-parallel backward (identity); `x` is not changed."""
    return _AllReduceSum.apply(x, group)


@torch.no_grad()
def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.detach().clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def all_reduce_max(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Elementwise max over `group`, detached (a shift for the log-sum-exp, or a comparison)."""
    return _all_reduce(x, dist.ReduceOp.MAX, group)


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice [offset, offset + size) of a vocabulary of `vocab` entries sharded over `group`,
    and the reductions over the whole vocabulary of [c, size] local rows (each gives one value per row,
    the same on every rank). `sum`, `logsumexp` and `log_softmax` are differentiable; `max` and `argmax`
    are not."""

    group: dist.ProcessGroup
    offset: int
    size: int
    vocab: int

    @classmethod
    def of(cls, logits: torch.Tensor) -> VocabShard:
        """The shard of vocabulary-sharded DTensor `logits` held by this rank (checked by `vocab_sharded`)."""
        if not vocab_sharded(logits):
            raise ValueError(f"expected a DTensor sharded on the vocabulary, got a {type(logits).__name__}")
        mesh, vocab = logits.device_mesh, logits.shape[-1]
        chunk = -(-vocab // mesh.size())  # torch.chunk's split, as Shard lays it out
        offset = min(mesh.get_local_rank() * chunk, vocab)
        size = min(chunk, vocab - offset)
        if logits.to_local().shape[-1] != size:
            raise ValueError(
                f"rank {mesh.get_local_rank()} holds {logits.to_local().shape[-1]} vocabulary entries, "
                f"expected {size} (torch.chunk of {vocab} over {mesh.size()} ranks)"
            )
        return cls(mesh.get_group(), offset, size, vocab)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x.sum(-1), self.group)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        local = x.detach().amax(-1) if self.size else x.new_full(x.shape[:-1], -torch.inf)
        return all_reduce_max(local, self.group)

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        """log sum_v exp(x_v) over the vocabulary, shifted by the (detached) global max as torch does."""
        m = self.max(x)
        return m + self.sum((x - m[:, None]).exp()).log()

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.logsumexp(x)[:, None]

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Global index of each row's maximum, the first one on ties (as torch.argmax)."""
        m = self.max(x)
        if self.size:
            local_max, local_idx = x.max(-1)  # the first maximal index of the slice
            idx = torch.where(local_max == m, local_idx + self.offset, self.vocab)
        else:
            idx = torch.full(x.shape[:-1], self.vocab, dtype=torch.long, device=x.device)
        return _all_reduce(idx, dist.ReduceOp.MIN, self.group)

    def align(self, like: DTensor, other: torch.Tensor) -> torch.Tensor:
        """This rank's slice of `other`, laid out as `like` (this shard's logits): the local tensor of a
        DTensor placed as `like`, a slice of a plain full tensor (no communication), or the local tensor
        of any other DTensor on the same mesh after `redistribute`."""
        if other.shape != like.shape:
            raise ValueError(f"shapes differ: {tuple(like.shape)} and {tuple(other.shape)}")
        if not isinstance(other, DTensor):
            return other.narrow(-1, self.offset, self.size)
        if other.device_mesh != like.device_mesh or other.placements != like.placements:
            other = other.redistribute(like.device_mesh, like.placements)
        return other.to_local()


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token cross-entropy [N] of vocabulary-sharded DTensor `logits` [..., V] against `targets` [...].

    Computed in fp32 (fp64 for fp64 logits); 0 where the target is `ignore_index`. The gradient
    (softmax - one-hot on each rank's slice) reaches `logits` through autograd.
    """
    shard = VocabShard.of(logits)
    local = logits.to_local()
    dtype = torch.promote_types(local.dtype, torch.float32)
    x = local.flatten(0, -2).to(dtype)  # [N, V / tp]; not reshape(-1, size): a slice may be empty
    t = targets.reshape(-1).to(x.device)
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != logits shape without vocab {tuple(logits.shape[:-1])}")
    lse = shard.logsumexp(x)
    mine = (t >= shard.offset) & (t < shard.offset + shard.size)
    picked = x.new_zeros(t.shape)
    if shard.size:
        idx = torch.where(mine, t - shard.offset, 0)
        picked = torch.where(mine, x.gather(1, idx[:, None]).squeeze(1), picked)
    loss = lse - all_reduce_sum(picked, shard.group)
    return torch.where(t == ignore_index, 0.0, loss)
