"""Next-token cross-entropy over valid tokens (a helper; the model itself computes no loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of `logits` [B, L, V] against `targets` [B, L], in fp32.

    Averaged over valid tokens only: those with `mask` true (when given) and target != -100. Returns 0
    (still differentiable) when no token is valid.
    """
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
