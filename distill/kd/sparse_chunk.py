"""The per-chunk math of the sparse KD loss (`distill.kd.sparse`): bucket masses, losses and the factors of
their gradient, for one chunk of student logits. `distill.kd.sparse._SparseKD` (whole logits) and
`distill.kd.fused` (logits made chunk by chunk from the hidden states) both call `sparse_chunk` and `sparse_grad`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from distill.losses import IGNORE_INDEX

NEG_INF = float("-inf")


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """logaddexp whose gradient is 0, not NaN, where both are -inf."""
    both = (a == NEG_INF) & (b == NEG_INF)
    return torch.logaddexp(a.masked_fill(both, 0.0), b.masked_fill(both, 0.0)).masked_fill(both, NEG_INF)


def _kl(w: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_j w_j (log_a_j - log_b_j) over the buckets, a term being 0 (gradient too) wherever w_j == 0."""
    return (w * torch.where(w > 0, log_a - log_b, 0.0)).sum(-1)


def _bucket_grads(log_q: torch.Tensor, log_p: torch.Tensor, kind: str,
                  beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss [c], and g = d loss / d Q_b on the k + 1 buckets with h = Q_b * g_b [c, k + 1]
    (both 0 where Q_b = 0), for bucket log-masses log_q (student) and log_p (teacher, normalised)."""
    p, q = log_p.exp(), log_q.exp()
    live = q > 0
    if kind == "forward_kl":
        loss = _kl(p, log_p, log_q)
        h = -p
        g = torch.where(live, -(log_p - log_q).exp(), 0.0)
    else:
        if kind == "reverse_kl":
            log_r, scale = log_p, 1.0
            loss = _kl(q, log_q, log_p)
        else:  # jsd: the terms through the mixture cancel in dL/dQ
            log_r, scale = _logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta)), 1.0 - beta
            loss = beta * _kl(p, log_p, log_r) + scale * _kl(q, log_q, log_r)
        g = torch.where(live, (log_q - log_r + (1.0 if kind == "reverse_kl" else 0.0)) * scale, 0.0)
        h = q * g
    return loss, g, h


class SparseChunk(NamedTuple):
    """One chunk of `sparse_chunk`: per-token losses and the factors of d loss / d logits (`sparse_grad`)."""

    kd: torch.Tensor  # [c] KD loss per token, not yet scaled by T^2
    ce: torch.Tensor | None  # [c] cross-entropy per token at T = 1 (0 where the target is -100); None without targets
    ce_ok: torch.Tensor | None  # [c] 1.0 where the target counts, else 0.0
    z: torch.Tensor  # [c, V] q = softmax(s / T) with the top-k entries zeroed
    coef: torch.Tensor  # [c] r - G
    h_k: torch.Tensor  # [c, k] h_j - q_j G
    q_k: torch.Tensor | None  # [c, k] q on the top-k (the CE's share at T = 1); None otherwise
    q1: torch.Tensor | None  # [c, V] softmax(s) for the CE at T != 1, only when asked (`need_q1`)


def sparse_chunk(s: torch.Tensor, ids: torch.Tensor, log_p: torch.Tensor, targets: torch.Tensor | None, kind: str,
                 temperature: float, beta: float, need_q1: bool = False, out: torch.Tensor | None = None) -> SparseChunk:
    """The sparse KD loss (and, with `targets`, the cross-entropy) of one chunk of student logits `s` [c, V]
    (compute dtype; not modified), the top-k `ids` [c, k] and the teacher's bucket log-masses `log_p` [c, k + 1],
    with one softmax pass over the vocabulary (written into `out` when given). `sparse_grad` turns the result
    into the gradient; `_SparseKD` (whole logits) and `distill.kd.fused` (logits made chunk by chunk) share it."""
    k = ids.shape[1]
    ce = ok = q1 = lse1 = None
    if targets is not None:
        ok = targets != IGNORE_INDEX
        lse1 = s.logsumexp(-1)
        ce = torch.where(ok, lse1 - s.gather(-1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
        if need_q1 and temperature != 1.0:
            q1 = (s - lse1[:, None]).exp_()
    if temperature != 1.0:
        s = s / temperature
    lse = lse1 if lse1 is not None and temperature == 1.0 else s.logsumexp(-1)
    s_k = s.gather(-1, ids)
    q = torch.sub(s, lse[:, None], out=out).exp_() if out is not None else (s - lse[:, None]).exp_()
    q.scatter_(-1, ids, 0.0)
    log_q = torch.cat([s_k - lse[:, None], q.sum(-1).log()[:, None]], -1)
    log_p = log_p - log_p.logsumexp(-1, keepdim=True)  # quantised targets stay a distribution
    loss, g, h = _bucket_grads(log_q, log_p, kind, beta)
    big_g = h.sum(-1, keepdim=True)
    top = log_q[:, :k].exp()
    q_k = top if targets is not None and temperature == 1.0 else None
    return SparseChunk(loss, ce, None if ok is None else ok.to(s.dtype), q, (g[:, k:] - big_g).squeeze(1),
                       h[:, :k] - top * big_g, q_k, q1)


def sparse_grad(z: torch.Tensor, coef: torch.Tensor, h_k: torch.Tensor, q_k: torch.Tensor | None,
                ce_ok: torch.Tensor | None, q1: torch.Tensor | None, ids: torch.Tensor, targets: torch.Tensor | None,
                a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """d (A * KD + B * CE) / d logits from `sparse_chunk`'s factors, written into `z` (consumed), for rows of
    any number (a chunk, or every row). With KD = T^2 sum of the per-token losses and CE their plain sum,
    a = A * T (T^2 times the 1 / T of s = logits / T) and b = B; e.g. a = T / tokens for a mean KD loss."""
    shared = targets is not None and q1 is None  # the CE at T = 1 shares z
    row = a * coef + (b * ce_ok if shared else 0.0)
    grad = z.mul_(row[:, None].to(z.dtype))
    top = a * h_k + (b * ce_ok[:, None] * q_k if shared else 0.0)
    grad.scatter_add_(-1, ids, top.to(grad.dtype))  # z is 0 on the top-k
    if targets is not None:
        if q1 is not None:
            grad.add_(q1 * (b * ce_ok)[:, None].to(q1.dtype))
        grad.scatter_add_(-1, targets.clamp(min=0)[:, None], -(b * ce_ok)[:, None].to(grad.dtype))
    return grad
