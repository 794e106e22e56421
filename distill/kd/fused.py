"""The fused, chunked LM head and loss: the training loss from the hidden states, never the full logits.

`fused_head_loss(hidden, weight, targets, mask, teacher=...)` computes, chunk by chunk of `chunk_size` valid
tokens, the student's logits s_c = h_c W^T, the cross-entropy against `targets` and the KD divergence of
`distill.kd` (forward_kl, reverse_kl, jsd with beta; temperature T; means over valid tokens exactly as `lm_loss`
and `kd_loss` / `lm_sparse_kd_loss`), with the teacher given as

    TeacherHidden(hidden, weight)   its final normalised hidden states and head weight (rows = the student's
                                    vocabulary): teacher logits per chunk, h_t[c] W_t^T, under no_grad;
    a tensor [..., V]               the teacher's logits (a teacher with no hidden-only path, e.g. Hugging Face);
    TopK                            offline sparse targets (`distill.kd.sparse`);
    None                            the cross-entropy alone (pretraining).

The per-chunk math is `distill.kd.dense_chunk` (CE, the KD divergences of `distill.kd.losses._divergence`, one
log-softmax shared where it can be) and `distill.kd.sparse_chunk.sparse_chunk` / `sparse_grad`; on CPU a chunk
is at most a few hundred rows, so that its [rows, V] tensors stay in cache (`dense_chunk.cache_rows`).
Liger-Kernel's technique, in plain torch for CPU and GPU: the gradient d loss / d s_c is made in the forward,
then at once grad_h[c] = g_c W and grad_W += g_c^T h_c, so the backward only scales the two stored gradients
by grad_out.

Weights: as the gradients are made in the forward, the function takes the terms' weights and returns one
differentiable `loss = ce_weight * ce + kd_weight * kd` (its gradient is exact whatever follows); `ce`, `kd` and
the teacher's own cross-entropy come back detached, for logging. Storing a gradient per term instead would
double the head-gradient memory and the backward matmuls.

Precision: the logits and every softmax are in at least fp32; the head matmuls run in the inputs' dtype, or
in the autocast dtype when autocast is on for the device (as the unfused head would), accumulated in fp32.
Memory: per chunk about six [chunk, V] fp32 tensors at the peak with CE + forward KL at temperature 1 (student
and teacher logits, their log-softmaxes, the teacher's probabilities, the gradient in place of the student's
log-softmax), up to nine for the other divergences, freed before the next chunk; for the whole call grad_h
[N, d] and grad_W [V, d] in fp32, plus W (and the teacher's head) in the matmul dtype when it differs. The full
[N, V] logits of neither model ever exist: at 4,096 tokens x 32,000 entries the step's peak is 103 MiB against
3,002 MiB unfused (tests/test_fused_head.py: 128-row chunks on CPU), and the ratio falls as tokens grow (the
chunk size, not N, sets it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from distill.kd.dense_chunk import cache_rows, dense_chunk
from distill.kd.losses import _compute_dtype
from distill.kd.schedule import KDConfig, _check_loss_args
from distill.kd.sparse import TopK, _check_k
from distill.kd.sparse_chunk import sparse_chunk, sparse_grad
from distill.losses import IGNORE_INDEX


class TeacherHidden(NamedTuple):
    """The teacher side of online KD without its logits: final normalised hidden states [..., d_t] (the
    student's leading dims) and head weight [V, d_t] (trimmed to the student's vocabulary), the matmul in
    `dtype` (None: the two tensors' promoted dtype)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    dtype: torch.dtype | None = None


class FusedTerms(NamedTuple):
    loss: torch.Tensor  # ce_weight * ce + kd_weight * kd: differentiable w.r.t. the hidden states and head weight
    ce: torch.Tensor  # detached: mean CE over tokens with mask and target != -100
    kd: torch.Tensor  # detached: mean KD over tokens with mask (0 without a teacher)
    teacher_ce: torch.Tensor | None  # detached: the teacher's own mean CE, when asked (dense teachers only)


class _Spec(NamedTuple):
    kind: str
    temperature: float
    beta: float
    chunk_size: int
    ce_weight: float
    kd_weight: float
    teacher_ce: bool
    mm_dtype: torch.dtype | None


class _Teacher:
    """The teacher's logits of a chunk, fresh (the divergence overwrites them), or its sparse targets."""

    def __init__(self, logits=None, hidden=None, weight=None, mm=None, ids=None, log_p=None):
        self.logits, self.hidden, self.weight, self.mm, self.ids, self.log_p = logits, hidden, weight, mm, ids, log_p
        self.sparse = ids is not None

    def dense(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.logits is not None:
            return self.logits.index_select(0, idx).to(dtype)  # index_select: a copy
        return (self.hidden.index_select(0, idx).to(self.mm) @ self.weight.T).to(dtype)


class _FusedHead(torch.autograd.Function):
    """(loss, ce, kd, teacher_ce) over the rows `rows` of hidden [N, d] with head weight [V, d]; see the module
    docstring. Only `loss` is differentiable; its gradients w.r.t. hidden and weight are made in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, targets, n_ce, teacher, spec):  # type: ignore[override]
        cdt = _compute_dtype(hidden, weight)
        mm = spec.mm_dtype or torch.promote_types(hidden.dtype, weight.dtype)
        w_mm = weight.to(mm)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need = need_h or need_w
        n, d = hidden.shape
        contiguous = rows.numel() == n
        zeros = lambda *shape: torch.zeros(shape, dtype=cdt, device=hidden.device)  # noqa: E731
        grad_h = (torch.empty(n, d, dtype=cdt, device=hidden.device) if contiguous else zeros(n, d)) if need_h else None
        grad_w = zeros(*weight.shape) if need_w else None
        ce_total, kd_total, t_total = zeros(), zeros(), zeros()
        n_kd, T = max(rows.numel(), 1), spec.temperature
        a_ce, a_kd = spec.ce_weight / n_ce.to(cdt), spec.kd_weight / n_kd
        step = cache_rows(spec.chunk_size, weight.shape[0], hidden.device)
        for start in range(0, rows.numel(), step):
            idx = rows[start:start + step]
            span = slice(start, start + idx.numel())
            h_c = (hidden[span] if contiguous else hidden.index_select(0, idx)).to(mm)
            s = (h_c @ w_mm.T).to(cdt)
            tgt = None if targets is None else targets.index_select(0, idx)
            g = None
            if teacher is not None and teacher.sparse:
                c = sparse_chunk(s, teacher.ids.index_select(0, idx), teacher.log_p.index_select(0, idx).to(cdt),
                                 tgt, spec.kind, T, spec.beta, need_q1=need)
                kd_total += c.kd.sum() * (T * T)
                if tgt is not None:
                    ce_total += c.ce.sum()
                if need:
                    g = sparse_grad(c.z, c.coef, c.h_k, c.q_k, c.ce_ok, c.q1, teacher.ids.index_select(0, idx), tgt,
                                    a_kd * T, a_ce)
            else:
                t = None if teacher is None else teacher.dense(idx, cdt)
                ce, kd, t_ce, g = dense_chunk(s, t, tgt, kind=spec.kind, temperature=T, beta=spec.beta, a_ce=a_ce,
                                              a_kd=a_kd, need=need, teacher_ce=spec.teacher_ce,
                                              finite_teacher=teacher is not None and teacher.logits is None)
                ce_total += 0.0 if ce is None else ce.sum()
                kd_total += 0.0 if kd is None else kd.sum()
                t_total += 0.0 if t_ce is None else t_ce.sum()
            if g is None:
                continue
            g = g.to(mm)
            if need_h:
                if contiguous and mm == cdt:
                    torch.mm(g, w_mm, out=grad_h[span])
                elif contiguous:
                    grad_h[span] = g @ w_mm
                else:
                    grad_h.index_copy_(0, idx, (g @ w_mm).to(cdt))
            if need_w:
                if mm == cdt:
                    grad_w.addmm_(g.T, h_c)
                else:
                    grad_w += (g.T @ h_c).to(cdt)
        ce, kd, t_ce = ce_total / n_ce.to(cdt), kd_total / n_kd, t_total / n_ce.to(cdt)
        ctx.grads = (grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(ce, kd, t_ce)
        return spec.ce_weight * ce + spec.kd_weight * kd, ce, kd, t_ce

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, *_):  # type: ignore[override]
        grad_h, grad_w = ctx.grads  # out of place: a backward with retain_graph may come again
        dh = None if grad_h is None else (grad_h * g_loss.to(grad_h.dtype)).to(ctx.dtypes[0])
        dw = None if grad_w is None else (grad_w * g_loss.to(grad_w.dtype)).to(ctx.dtypes[1])
        return dh, dw, None, None, None, None, None


def _teacher_side(teacher: TeacherHidden | TopK | torch.Tensor | None, lead: tuple[int, ...], vocab: int,
                  dev: torch.device) -> _Teacher | None:
    """The teacher flattened to the student's N rows, its shapes checked."""
    if teacher is None:
        return None
    if isinstance(teacher, TopK):
        ids, logp, tail = teacher
        if tuple(ids.shape[:-1]) != lead or logp.shape != ids.shape or tuple(tail.shape) != lead:
            raise ValueError(f"top-k targets ids {tuple(ids.shape)} / logp {tuple(logp.shape)} / tail "
                             f"{tuple(tail.shape)} do not match the hidden states' leading dims {lead}")
        k = ids.shape[-1]
        _check_k(k, vocab)
        log_p = torch.cat([logp.detach().reshape(-1, k), tail.detach().reshape(-1, 1)], -1).to(dev)
        return _Teacher(ids=ids.reshape(-1, k).to(device=dev, dtype=torch.long), log_p=log_p)
    if isinstance(teacher, TeacherHidden):
        h, w = teacher.hidden.detach(), teacher.weight.detach()
        if tuple(h.shape[:-1]) != lead or w.dim() != 2 or w.shape != (vocab, h.shape[-1]):
            raise ValueError(f"teacher hidden states {tuple(h.shape)} / head weight {tuple(w.shape)} do not match "
                             f"the student's leading dims {lead} and vocabulary {vocab}")
        mm = teacher.dtype or torch.promote_types(h.dtype, w.dtype)
        return _Teacher(hidden=h.reshape(-1, h.shape[-1]), weight=w.to(mm), mm=mm)  # one cast per call
    if tuple(teacher.shape) != (*lead, vocab):
        raise ValueError(f"teacher logits {tuple(teacher.shape)} do not match the student's {(*lead, vocab)}")
    return _Teacher(logits=teacher.detach().reshape(-1, vocab))


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    *,
    teacher: TeacherHidden | TopK | torch.Tensor | None = None,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int = 1024,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    teacher_ce: bool = False,
) -> FusedTerms:
    """The LM head `weight` [V, d] on `hidden` [..., d] and the training loss, chunk by chunk (module docstring).

    `targets` [...] (long, -100 = ignored; None: no cross-entropy), `mask` [...] (True = valid; None: all);
    `teacher` as in the module docstring. Returns `FusedTerms`; `teacher_ce` asks for the teacher's own CE
    (a dense teacher only; it costs one logsumexp per chunk). Plain tensors only: a vocabulary-sharded
    (DTensor) head keeps the unfused path."""
    _check_loss_args(loss, temperature, beta, chunk_size)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"head weight {tuple(weight.shape)} does not fit hidden states {tuple(hidden.shape)}")
    lead, dev = tuple(hidden.shape[:-1]), hidden.device
    if mask is not None and tuple(mask.shape) != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} != hidden states' leading dims {lead}")
    if targets is not None and tuple(targets.shape) != lead:
        raise ValueError(f"targets {tuple(targets.shape)} do not match the hidden states' leading dims {lead}")
    side = _teacher_side(teacher, lead, weight.shape[0], dev)
    flat = hidden.reshape(-1, hidden.shape[-1])
    valid = None if mask is None else mask.reshape(-1).to(device=dev, dtype=torch.bool)
    tgt = None if targets is None else targets.reshape(-1).to(device=dev, dtype=torch.long)
    if tgt is None:
        n_ce = torch.ones((), device=dev)
    else:
        ok = tgt != IGNORE_INDEX
        ok = ok if valid is None else ok & valid
        n_ce = ok.sum().clamp(min=1)  # a tensor: no host sync for it
        if side is None:  # the CE alone: only its tokens
            valid = ok
    rows = torch.arange(flat.shape[0], device=dev) if valid is None else valid.nonzero().squeeze(1)
    autocast = torch.is_autocast_enabled(dev.type)
    spec = _Spec(loss, float(temperature), float(beta), int(chunk_size), float(ce_weight),
                 float(kd_weight) if side is not None else 0.0, bool(teacher_ce) and side is not None and not side.sparse,
                 torch.get_autocast_dtype(dev.type) if autocast else None)
    with torch.autocast(dev.type, enabled=False):
        out, ce, kd, t_ce = _FusedHead.apply(flat, weight, rows, tgt, n_ce, side, spec)
    return FusedTerms(out, ce, kd, t_ce if spec.teacher_ce else None)


def fused_head_from_config(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           mask: torch.Tensor | None, cfg: KDConfig,
                           teacher: TeacherHidden | TopK | torch.Tensor | None, *, ce_weight: float = 1.0,
                           kd_weight: float = 1.0, teacher_ce: bool = False) -> FusedTerms:
    """`fused_head_loss` with loss, temperature, beta and chunk size from the `kd` node."""
    return fused_head_loss(hidden, weight, targets, mask, teacher=teacher, loss=cfg.loss,
                           temperature=cfg.temperature, beta=cfg.beta, chunk_size=cfg.chunk_size,
                           ce_weight=ce_weight, kd_weight=kd_weight, teacher_ce=teacher_ce)
