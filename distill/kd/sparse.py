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

Numerics and cost: everything is in log space in at least fp32, chunk by chunk over the valid tokens,
with one softmax pass over the vocabulary per chunk (`_SparseKD`): the student's tail mass is the sum of
its softmax outside the top-k (exact even when tiny; no 1 - sum cancellation), and the gradient is
written from that same pass (d/ds = q (r - G) outside the top-k, O(k) corrections on it), so the
backward is one scaled copy. `lm_sparse_kd_loss` computes the next-token cross-entropy from the same
pass (at T = 1), so offline KD costs about what the cross-entropy alone costs. An empty tail gives -inf
with a zero (not NaN) gradient. The stored teacher buckets are renormalised (a no-op up to rounding for
exact targets; it keeps quantised targets a proper distribution, so the loss stays >= 0). The teacher
targets are constants (no gradient).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from distill.kd.losses import _compute_dtype
from distill.kd.schedule import _check_loss_args
from distill.kd.sparse_chunk import NEG_INF, SparseChunk, sparse_chunk, sparse_grad
from distill.losses import is_dtensor

__all__ = ["TopK", "SparseChunk", "lm_sparse_kd_loss", "sparse_chunk", "sparse_grad", "sparse_kd_loss",
           "teacher_topk"]


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


class _SparseKD(torch.autograd.Function):
    """Mean sparse KD loss (and, with `targets`, the mean cross-entropy) over the rows `rows` of 2-D logits.

    One pass of softmaxes over the vocabulary per chunk (`sparse_chunk`), in the forward: q = softmax(s / T)
    gives the bucket masses (the tail summed over the entries outside the top-k, exact, no 1 - sum), and is kept
    with the top-k entries zeroed (`z`, one [N, V] tensor in the student's dtype, the size of the gradient
    autograd would hold anyway). With per-bucket h_b = Q_b dL/dQ_b, G = sum_b h_b and r = dL/dQ_tail,
    d loss / d (s / T) is q_v (r - G) outside the top-k and h_j - q_j G at its j-th id; the backward
    (`sparse_grad`) is one scaled copy of `z` plus O(k) scatters per token. The cross-entropy (T = 1 rows of
    the same logits, valid where the target is not -100) shares that pass when T = 1: its gradient q - onehot
    is `z` plus the top-k masses and minus one at the target; at T != 1 it keeps its own q.
    """

    @staticmethod
    def forward(ctx, student, rows, ids, log_p, targets, kind, temperature, beta, chunk_size):  # type: ignore[override]
        dtype = _compute_dtype(student, log_p)
        dev, n_rows, k = student.device, student.shape[0], ids.shape[1]
        with_ce = targets is not None
        need_grad = ctx.needs_input_grad[0]
        kd_total = torch.zeros((), dtype=dtype, device=dev)
        ce_total = torch.zeros((), dtype=dtype, device=dev)
        z = torch.zeros_like(student) if need_grad else None
        q1 = torch.zeros_like(student) if need_grad and with_ce and temperature != 1.0 else None
        coef = torch.zeros(n_rows, dtype=dtype, device=dev)  # r - G per row
        h_k = torch.zeros(n_rows, k, dtype=dtype, device=dev)  # h_j - q_j G
        q_k = torch.zeros(n_rows, k, dtype=dtype, device=dev)  # q at T = 1 on the top-k (the CE's share)
        ce_ok = torch.zeros(n_rows, dtype=dtype, device=dev)
        # all rows valid (no mask): chunks are slices, read in place and softmaxed straight into z
        contiguous = rows.numel() == n_rows
        in_place = need_grad and contiguous and z.dtype == dtype
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start:start + chunk_size]
            span = slice(start, start + idx.numel())
            s = student[span].to(dtype) if contiguous else student.index_select(0, idx).to(dtype)
            c_ids = ids[span] if contiguous else ids.index_select(0, idx)
            tgt = None
            if with_ce:
                tgt = targets[span] if contiguous else targets.index_select(0, idx)
            c = sparse_chunk(s, c_ids, log_p.index_select(0, idx).to(dtype), tgt, kind, temperature, beta,
                             need_q1=q1 is not None, out=z[span] if in_place else None)
            kd_total += c.kd.sum()
            if with_ce:
                ce_total += c.ce.sum()
                ce_ok.index_copy_(0, idx, c.ce_ok)
                if q1 is not None:
                    q1.index_copy_(0, idx, c.q1.to(q1.dtype))
            if need_grad:
                coef.index_copy_(0, idx, c.coef)
                h_k.index_copy_(0, idx, c.h_k)
                if c.q_k is not None:
                    q_k.index_copy_(0, idx, c.q_k)
                if not in_place:
                    z.index_copy_(0, idx, c.z.to(z.dtype))
        n_kd = max(rows.numel(), 1)
        n_ce = ce_ok.sum().clamp(min=1.0)  # a tensor: no host sync in the training step
        t2 = temperature * temperature
        if need_grad:
            ctx.save_for_backward(z, q1, coef, h_k, q_k, ce_ok, ids, targets if with_ce else None)
        ctx.scales = (temperature / n_kd, 1.0 / n_ce)
        return ce_total / n_ce, kd_total * t2 / n_kd

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ce, g_kd):  # type: ignore[override]
        z, q1, coef, h_k, q_k, ce_ok, ids, targets = ctx.saved_tensors
        kd_scale, ce_scale = ctx.scales
        a, b = g_kd.to(coef.dtype) * kd_scale, g_ce.to(coef.dtype) * ce_scale
        # z is not needed again (once_differentiable)
        grad = sparse_grad(z, coef, h_k, q_k, ce_ok if targets is not None else None, q1, ids, targets, a, b)
        return grad, None, None, None, None, None, None, None, None


def _prepare(student_logits: torch.Tensor, targets: TopK, mask: torch.Tensor | None, loss: str,
             temperature: float, beta: float, chunk_size: int) -> tuple[torch.Tensor, ...]:
    """Checks; the 2-D student logits [N, V], the valid rows, the ids [N, k] and the bucket log-masses
    [N, k + 1] of the teacher."""
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
    log_p = torch.cat([logp.detach().reshape(ids.shape), tail.detach().reshape(-1, 1)], -1).to(dev)
    if mask is None:
        rows = torch.arange(student.shape[0], device=dev)
    else:
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} != logits shape without vocab {lead}")
        rows = mask.reshape(-1).to(device=dev, dtype=torch.bool).nonzero().squeeze(1)
    return student, rows, ids, log_p


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
    student, rows, ids, log_p = _prepare(student_logits, targets, mask, loss, temperature, beta, chunk_size)
    return _SparseKD.apply(student, rows, ids, log_p, None, loss, float(temperature), float(beta),
                           int(chunk_size))[1]


def lm_sparse_kd_loss(
    student_logits: torch.Tensor,
    lm_targets: torch.Tensor,
    targets: TopK,
    mask: torch.Tensor | None = None,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`distill.losses.lm_loss`, `sparse_kd_loss`) of the same logits in one pass over the vocabulary:
    the next-token cross-entropy against `lm_targets` (the leading dims; -100 = ignored) and the sparse KD
    loss, each the mean over its valid tokens (`mask` and, for the CE, a target other than -100)."""
    student, rows, ids, log_p = _prepare(student_logits, targets, mask, loss, temperature, beta, chunk_size)
    if tuple(lm_targets.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"lm targets {tuple(lm_targets.shape)} do not match logits {tuple(student_logits.shape)}")
    lm = lm_targets.reshape(-1).to(device=student.device, dtype=torch.long)
    ce, kd = _SparseKD.apply(student, rows, ids, log_p, lm, loss, float(temperature), float(beta), int(chunk_size))
    return ce, kd
