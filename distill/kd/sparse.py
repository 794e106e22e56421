"""KD losses from offline, sparse teacher targets: the teacher's top-k log-probabilities and its tail mass.

The teacher is run once; per token only `teacher_topk` is kept: the k largest log-probabilities
log p_t(v) of p_t = softmax(teacher_logits / T), their ids K (|K| = k) and the log of the tail mass
log(1 - sum_{v in K} p_t(v)). Both distributions are then collapsed onto k + 1 buckets, the k ids of K
and "the tail" (every other token, as one bucket):

    P = (p_t(v) for v in K,  p_t(tail) = 1 - sum_{v in K} p_t(v))           from the stored targets
    Q = (q(v)   for v in K,  q(tail)   = sum_{v not in K} q(v))              q = softmax(student_logits / T)

and `sparse_kd_loss` is the divergence of `distill.kd.losses` between P and Q, scaled by T^2, mean over
valid tokens: forward_kl T^2 KL(P || Q), reverse_kl T^2 KL(Q || P), jsd T^2 [beta KL(P || M) +
(1 - beta) KL(Q || M)] with M = beta P + (1 - beta) Q (GKD's beta convention). Every divergence here
is a function of the bucket masses only: the teacher's split of its tail is unknown, so the student is
only asked to put the right total mass on the tail (forward KL: p_t(tail) log(p_t(tail) / q(tail));
reverse KL: q(tail) log(q(tail) / p_t(tail)), which stays finite as long as the teacher's tail is not
empty; JSD: both against the mixture's tail). Collapsing buckets never increases a divergence (the
log-sum inequality), so this is a lower bound of the dense loss, tight when the tail is small.

With k = V the tail is empty on both sides (p_t(tail) = q(tail) = 0, log = -inf), a bucket with zero
mass contributes 0 to every sum, and the k buckets are the whole vocabulary in another order: the loss
(and its gradient) is the dense `kd_loss` exactly, up to rounding.

Numerics: everything is in log space in at least fp32, chunk by chunk over the valid tokens. The tail
log-masses are masked logsumexps, log sum_{v not in K} exp(x_v) - logsumexp(x), exact even when the tail
is far below fp32's epsilon (1 - sum p_topk would cancel); an empty tail gives -inf with a zero (not
NaN) gradient. The stored teacher buckets are renormalised (a no-op up to rounding for exact targets;
it keeps quantised targets a proper distribution, so the loss stays >= 0). Each chunk is
activation-checkpointed when the student needs a gradient, so only [chunk, V] temporaries exist at a
time. The teacher targets are constants (no gradient).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from distill.kd.losses import _compute_dtype
from distill.kd.schedule import _check_loss_args
from distill.losses import is_dtensor

NEG_INF = float("-inf")


class TopK(NamedTuple):
    """Sparse teacher targets: ids [..., k] (long), logp [..., k] (float, descending), tail [...] (float)."""

    ids: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor


def _check_k(k: int, vocab: int) -> None:
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k size k must be in [1, V = {vocab}], got {k}")


def _masked_logsumexp(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log sum_{v not in ids} exp(x_v) over the last dim (ids unique per row): -inf, with a zero gradient,
    for a row whose remaining entries are all -inf (or none remain)."""
    x = x.scatter(-1, ids, NEG_INF)
    m = x.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = (x - m).exp().sum(-1)
    ok = total > 0
    return torch.where(ok, torch.where(ok, total, 1.0).log(), NEG_INF) + m.squeeze(-1)


@torch.no_grad()
def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """The k largest log-probabilities of softmax(teacher_logits / T) over the last dim (descending), their
    ids, and the log of the remaining mass (-inf when k = V); in at least fp32. Logits are [..., V]."""
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}")
    _check_k(k, teacher_logits.shape[-1])
    logits = teacher_logits.detach().to(_compute_dtype(teacher_logits))
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    logp, ids = log_p.topk(k, dim=-1, sorted=True)
    return TopK(ids, logp, _masked_logsumexp(log_p, ids))


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """logaddexp whose gradient is 0, not NaN, where both are -inf."""
    both = (a == NEG_INF) & (b == NEG_INF)
    return torch.logaddexp(a.masked_fill(both, 0.0), b.masked_fill(both, 0.0)).masked_fill(both, NEG_INF)


def _kl(w: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_j w_j (log_a_j - log_b_j) over the buckets, a term being 0 (gradient too) wherever w_j == 0."""
    return (w * torch.where(w > 0, log_a - log_b, 0.0)).sum(-1)


def _chunk_loss(
    student: torch.Tensor,
    idx: torch.Tensor,
    ids: torch.Tensor,
    logp: torch.Tensor,
    tail: torch.Tensor,
    kind: str,
    temperature: float,
    beta: float,
) -> torch.Tensor:
    """Summed, T^2-scaled loss of the rows `idx` of the 2-D student logits against their bucket targets."""
    dtype = _compute_dtype(student, logp)
    s = student.index_select(0, idx).to(dtype)
    if temperature != 1.0:
        s = s / temperature
    ids = ids.index_select(0, idx)
    lse = s.logsumexp(-1, keepdim=True)
    log_q = torch.cat([s.gather(-1, ids) - lse, (_masked_logsumexp(s, ids) - lse.squeeze(-1))[:, None]], -1)
    log_p = torch.cat([logp.index_select(0, idx), tail.index_select(0, idx)[:, None]], -1).to(dtype)
    log_p = log_p - log_p.logsumexp(-1, keepdim=True)
    p = log_p.exp()
    if kind == "forward_kl":
        loss = _kl(p, log_p, log_q)
    else:
        q = log_q.exp()
        if kind == "reverse_kl":
            loss = _kl(q, log_q, log_p)
        else:  # jsd
            log_m = _logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
            loss = beta * _kl(p, log_p, log_m) + (1.0 - beta) * _kl(q, log_q, log_m)
    return loss.sum() * (temperature * temperature)


def sparse_kd_loss(
    student_logits: torch.Tensor,
    targets: TopK,
    mask: torch.Tensor | None = None,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Mean KD loss over valid tokens between the student and sparse teacher targets, on k + 1 buckets.

    `student_logits` is [..., V] (any float dtype, a plain tensor), `targets` a `TopK` with ids/logp
    [..., k] and tail [...] for the same leading dims (from `teacher_topk` at the same temperature),
    `mask` the leading dims, True (nonzero) = valid. Returns a 0-dim float tensor (0 if no token is
    valid); only `student_logits` gets a gradient.
    """
    _check_loss_args(loss, temperature, beta, chunk_size)
    if is_dtensor(student_logits):
        raise ValueError("sparse_kd_loss takes plain student logits, not a vocabulary-sharded DTensor")
    ids, logp, tail = targets
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if student_logits.dim() < 2 or ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead:
        raise ValueError(
            f"target ids {tuple(ids.shape)} do not match student logits {tuple(student_logits.shape)}"
        )
    if logp.shape != ids.shape or tuple(tail.shape) != lead:
        raise ValueError(
            f"logp {tuple(logp.shape)} / tail {tuple(tail.shape)} do not match ids {tuple(ids.shape)}"
        )
    _check_k(ids.shape[-1], vocab)
    student = student_logits.flatten(0, -2)
    dev = student.device
    ids = ids.reshape(-1, ids.shape[-1]).to(device=dev, dtype=torch.long)
    logp, tail = logp.detach().reshape(ids.shape).to(dev), tail.detach().reshape(-1).to(dev)
    if mask is None:
        rows = torch.arange(student.shape[0], device=dev)
    else:
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} != logits shape without vocab {lead}")
        rows = mask.reshape(-1).to(device=dev, dtype=torch.bool).nonzero().squeeze(1)
    dtype = _compute_dtype(student, logp)
    total = student[:0].sum().to(dtype)  # 0, on the student's graph even when no token is valid
    use_ckpt = torch.is_grad_enabled() and student.requires_grad
    args = (loss, float(temperature), float(beta))
    for idx in rows.split(chunk_size):
        if use_ckpt:
            total = total + checkpoint(_chunk_loss, student, idx, ids, logp, tail, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss(student, idx, ids, logp, tail, *args)
    return total / max(rows.numel(), 1)
