"""Knowledge-distillation losses, and the validation metrics against the teacher.

Per valid token, with temperature T, p_t = softmax(teacher_logits / T), p_s = softmax(student_logits / T):

    forward_kl   T^2 * KL(p_t || p_s)                    (the paper's KD term; mass-covering)
    reverse_kl   T^2 * KL(p_s || p_t)                    (mode-seeking)
    jsd          T^2 * [beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)],  m = beta * p_t + (1 - beta) * p_s

JSD convention: the generalised JSD of GKD (Agarwal et al., 2024): `beta` weights the teacher both in
the mixture and in the sum. beta = 0.5 is the symmetric Jensen-Shannon divergence, bounded by log 2;
for any beta it is bounded by the binary entropy H(beta) (reached when the supports are disjoint). All
three are scaled by T^2 so gradient magnitudes do not shrink as 1/T^2 when T grows.

The loss is the mean over valid tokens (mask True), never divided by a fixed sequence length. It is
computed in log space in chunks of `chunk_size` valid tokens, each upcast to (at least) fp32 on its
own, so full [tokens, vocab] fp32 tensors never exist. The backward pass recomputes each chunk and
writes d loss / d student_logits in the student's dtype; the teacher is a constant (no gradient).
`_divergence` is the per-chunk step (loss and gradient w.r.t. the logits of one chunk); the fused LM head
(`distill.kd.fused`, training) calls it on logits it makes chunk by chunk from the hidden states.
`-inf` logits (masked vocabulary entries) are safe: a term with zero weight contributes 0, so an entry
where both models put -inf adds nothing. A distribution that puts mass where the one it is measured
against has none gives an infinite KL, as the math says (forward KL: student -inf where the teacher
has mass; reverse KL: the other way round); JSD is always finite.

Student logits may be a DTensor sharded on the vocabulary over a 1-D tensor-parallel mesh (a
column-parallel LM head): each rank then computes on its own vocabulary slice and all-reduces one value
per token for each reduction over the vocabulary (`distill.parallel.vocab`, imported only then). The
teacher's logits are brought to the student's slices (`VocabShard.align`). The divergences are the same
code either way; only their reductions over the vocabulary (`Vocab`) differ.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable

from distill.kd.schedule import KDConfig, _check_loss_args
from distill.losses import is_dtensor


class Vocab(Protocol):
    """Reductions over the vocabulary of [c, V] logits rows, one value per row."""

    def sum(self, x: torch.Tensor) -> torch.Tensor: ...
    def log_softmax(self, x: torch.Tensor) -> torch.Tensor: ...
    def argmax(self, x: torch.Tensor) -> torch.Tensor: ...


class _Dense:
    """The whole vocabulary in this process: the last dim (`VocabShard` is the tensor-parallel one)."""

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1)

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x, dim=-1)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(-1)


DENSE = _Dense()


def _weighted_log_ratio(w: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """sum_v w_v * (log_a_v - log_b_v) over the vocabulary (w >= 0), a term being 0 wherever w_v == 0."""
    return vocab.sum((log_a - log_b).mul_(w).masked_fill_(w == 0, 0.0))


def _divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    temperature: float,
    beta: float,
    need_grad: bool,
    vocab: Vocab = DENSE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token loss [c] and, if need_grad, its gradient w.r.t. the student logits [c, V].

    Inputs are float logits [c, V], or this rank's vocabulary slices of them with `vocab` a `VocabShard`
    (the gradient is then the slice's); fresh chunk copies: they may be overwritten. With s = student / T
    and q = p_s, d/ds of KL(p_t || q) is q - p_t; of sum q * g (g = log q - log r, r fixed) it is
    q * (g - sum q * g); JSD's gradient is (1 - beta) times the latter with r = m (the terms through
    m cancel).
    """
    if temperature != 1.0:
        student, teacher = student.div_(temperature), teacher.div_(temperature)
    log_ps, log_pt = vocab.log_softmax(student), vocab.log_softmax(teacher)
    pt = log_pt.exp()
    grad = None
    if kind == "forward_kl":
        loss = _weighted_log_ratio(pt, log_pt, log_ps, vocab)
        if need_grad:
            grad = log_ps.exp().sub_(pt)
    else:
        ps = log_ps.exp()
        if kind == "reverse_kl":
            log_r, scale = log_pt, 1.0
        else:  # jsd
            log_r, scale = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta)), 1.0 - beta
        ks = _weighted_log_ratio(ps, log_ps, log_r, vocab)  # summed over the whole vocabulary
        loss = ks if kind == "reverse_kl" else beta * _weighted_log_ratio(pt, log_pt, log_r, vocab) + scale * ks
        if need_grad:
            grad = (log_ps - log_r).sub_(ks[:, None]).mul_(ps).masked_fill_(ps == 0, 0.0).mul_(scale)
    t2 = temperature * temperature
    return loss * t2, (grad.mul_(temperature) if grad is not None else None)  # d/d logits = d/ds / T


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class _ChunkedKD(torch.autograd.Function):
    """Mean KD loss over the rows `rows` of 2-D logits, chunk by chunk.

    The gradient w.r.t. the student logits is written chunk by chunk during the forward pass (one
    [N, V] tensor in the student's dtype, the size of the gradient autograd would hold anyway), so the
    backward pass only scales it: no second pass of softmaxes over the vocabulary. With a `VocabShard`
    the logits are this rank's slices and so is the gradient.
    """

    @staticmethod
    def forward(ctx, student, teacher, rows, kind, temperature, beta, chunk_size, vocab):  # type: ignore[override]
        dtype = _compute_dtype(student, teacher)
        need_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=dtype, device=student.device)
        grad = torch.zeros_like(student) if need_grad else None
        for idx in rows.split(chunk_size):
            s, t = student.index_select(0, idx).to(dtype), teacher.index_select(0, idx).to(dtype)
            loss, g = _divergence(s, t, kind, temperature, beta, need_grad=need_grad, vocab=vocab)
            total += loss.sum()
            if grad is not None:
                grad.index_copy_(0, idx, g.to(grad.dtype))
        n = max(rows.numel(), 1)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.n = n
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * (grad_out / ctx.n).to(grad.dtype), None, None, None, None, None, None, None


def _flatten(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Vocab]:
    """2-D views [N, V] of both logits, the indices of the valid tokens, and the vocabulary reductions.

    DTensor student logits sharded on the vocabulary give this rank's slices [N, V / tp] (the student's
    differentiable, through `to_local`) and its `VocabShard`; anything else gives the logits and DENSE.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
        raise ValueError(
            f"student and teacher logits must have the same shape [..., V]; got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    vocab: Vocab = DENSE
    if is_dtensor(student_logits):
        from distill.parallel.vocab import VocabShard

        vocab = VocabShard.of(student_logits)
        student_logits, teacher_logits = student_logits.to_local(), vocab.align(student_logits, teacher_logits)
    student, teacher = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2)
    if mask is None:
        rows = torch.arange(student.shape[0], device=student.device)
    else:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != logits shape without vocab {tuple(student_logits.shape[:-1])}"
            )
        rows = mask.reshape(-1).to(device=student.device, dtype=torch.bool).nonzero().squeeze(1)
    return student, teacher, rows, vocab


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Mean KD loss over valid tokens (a 0-dim float tensor; 0 if no token is valid).

    Logits are [B, L, V] or [N, V] (any float dtype; computed in at least fp32); `mask` has the
    logits' shape without V, True (nonzero) = valid. Only `student_logits` gets a gradient. Student
    logits sharded on the vocabulary (tensor parallelism) take a teacher DTensor in any layout on their
    mesh, or the full plain tensor; every tp rank returns the same loss.
    """
    _check_loss_args(loss, temperature, beta, chunk_size)
    student, teacher, rows, vocab = _flatten(student_logits, teacher_logits.detach(), mask)
    return _ChunkedKD.apply(student, teacher, rows, loss, float(temperature), float(beta), int(chunk_size), vocab)


def kd_loss_from_config(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None, cfg: KDConfig
) -> torch.Tensor:
    """`kd_loss` with loss, temperature, beta and chunk size from `cfg` (the weight is the caller's)."""
    return kd_loss(
        student_logits,
        teacher_logits,
        mask,
        loss=cfg.loss,
        temperature=cfg.temperature,
        beta=cfg.beta,
        chunk_size=cfg.chunk_size,
    )


@torch.no_grad()
def kl_to_teacher(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Validation metric: mean KL(p_teacher || p_student) at T = 1 over valid tokens, in nats."""
    return kd_loss(
        student_logits, teacher_logits, mask, loss="forward_kl", temperature=1.0, chunk_size=chunk_size
    )


@torch.no_grad()
def top1_agreement(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of valid tokens where student and teacher argmax agree (0 if no token is valid); the
    first maximal index on ties, also over a vocabulary sharded over tp ranks."""
    student, teacher, rows, vocab = _flatten(student_logits, teacher_logits, mask)
    agree = (vocab.argmax(student) == vocab.argmax(teacher)).index_select(0, rows)
    return agree.float().sum() / max(rows.numel(), 1)
