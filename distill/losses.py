"""Next-token cross-entropy over valid tokens (the model itself computes no loss), on whole logits or on
logits sharded on the vocabulary by tensor parallelism (`distill.parallel.vocab`); `ce_chunk`, its per-chunk
terms and gradient for the fused LM head (`distill.kd.fused`: training never builds the full logits)."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of `logits` [B, L, V] against `targets` [B, L], in fp32.

    Averaged over valid tokens only: those with `mask` true (when given) and target != -100. Returns 0
    (still differentiable) when no token is valid. DTensor logits sharded on the vocabulary (tensor
    parallelism) are reduced over the tp ranks without gathering the vocabulary (distill/parallel/vocab.py).
    """
    if is_dtensor(logits):
        from distill.parallel.vocab import vocab_parallel_cross_entropy

        losses = vocab_parallel_cross_entropy(logits, targets, ignore_index=IGNORE_INDEX).float()
    else:
        losses = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
    valid = targets.reshape(-1) != IGNORE_INDEX
    if mask is not None:
        valid = valid & mask.reshape(-1).bool()
    return (losses * valid).sum() / valid.sum().clamp(min=1)


def ce_chunk(logits: torch.Tensor, targets: torch.Tensor,
             need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy per token [c] of one chunk of float logits [c, V] against `targets` [c] (0 where the target is
    -100) and, if need_grad, its gradient w.r.t. the logits, softmax - onehot [c, V] (0 on those rows). `logits` is
    not modified. The per-chunk step of the fused LM head (`distill.kd.fused`), equal to `lm_loss`'s terms."""
    ok = targets != IGNORE_INDEX
    tgt = targets.clamp(min=0)[:, None]
    lse = logits.logsumexp(-1)
    loss = torch.where(ok, lse - logits.gather(-1, tgt).squeeze(1), 0.0)
    if not need_grad:
        return loss, None
    grad = (logits - lse[:, None]).exp_()
    grad.scatter_add_(-1, tgt, torch.full(tgt.shape, -1.0, dtype=grad.dtype, device=grad.device))
    return loss, grad.mul_(ok[:, None].to(grad.dtype))


def is_dtensor(t: torch.Tensor) -> bool:
    """A DTensor can only exist once torch.distributed.tensor is loaded: dense runs never import it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)
