"""Next-token cross-entropy over valid tokens (the model itself computes no loss), on whole logits or on
logits sharded on the vocabulary by tensor parallelism (`distill.parallel.vocab`). The fused LM head's per-chunk
cross-entropy is in `distill.kd.dense_chunk`."""

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


def is_dtensor(t: torch.Tensor) -> bool:
    """A DTensor can only exist once torch.distributed.tensor is loaded: dense runs never import it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)
