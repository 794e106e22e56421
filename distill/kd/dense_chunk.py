"""The per-chunk math of the fused LM head (`distill.kd.fused`) with a dense teacher or none: the cross-entropy,
the KD divergence, the teacher's own cross-entropy, and the one gradient of their weighted sum w.r.t. the
student's logits, in as few passes over the [chunk, V] logits as the math allows.

The losses are `distill.losses.lm_loss`'s cross-entropy and `distill.kd.losses._divergence` (their terms and
gradients, summed with the weights); the passes are shared:

- one student log-softmax serves the cross-entropy and, at temperature 1, the KD divergence;
- forward KL at temperature 1 (the default KD) from two log-softmaxes and one exp each:
  KL_i = <p_t, log p_t>_i - <p_t, log q>_i (two row dot products, nothing written), and its gradient with
  the CE's as one tensor, g = (a_kd + a_ce [target valid]) q - a_kd p_t - a_ce onehot(target);
- the chunk is a few hundred rows, so each [chunk, V] tensor stays in the CPU's cache between passes
  (`CHUNK_BYTES`).

Dot products skip no terms, so the forward-KL shortcut is taken only for finite teacher logits (a teacher's
head applied per chunk: `finite_teacher`); logits given whole (a Hugging Face teacher may mask entries to -inf)
and every other divergence or temperature go through `_divergence`, which drops the terms where p_t = 0.
"""

from __future__ import annotations

import torch

from distill.kd.losses import _divergence
from distill.losses import IGNORE_INDEX

CHUNK_BYTES = 2 << 20  # one fp32 [rows, V] tensor of a chunk: about one core's L2 cache on current CPUs
MIN_ROWS = 128  # fewer rows would make the head's matmuls re-read the head weight for too little work


def cache_rows(chunk_size: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: at most `chunk_size` (kd.chunk_size); on CPU no more than keep a [rows, V] fp32 tensor
    within `CHUNK_BYTES`, nor fewer than `MIN_ROWS`. On GPUs the configured size stands."""
    if device.type != "cpu":
        return chunk_size
    return min(chunk_size, max(MIN_ROWS, CHUNK_BYTES // (4 * vocab)))


def dense_chunk(s: torch.Tensor, t: torch.Tensor | None, tgt: torch.Tensor | None, *, kind: str,
                temperature: float, beta: float, a_ce: torch.Tensor, a_kd: float, need: bool, teacher_ce: bool,
                finite_teacher: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                                               torch.Tensor | None]:
    """(ce [c] or None, kd [c] or None, teacher ce [c] or None, g [c, V] or None) of one chunk of fp32 student
    logits `s` [c, V] (overwritten), teacher logits `t` [c, V] (None: CE alone; overwritten) and `tgt` [c]
    (None: no CE; -100 = ignored). g = a_ce * dCE/ds + a_kd * dKD/ds when `need`, with a_ce the CE's weight per
    token (a 0-d tensor) and a_kd the KD's."""
    ok = None if tgt is None else tgt != IGNORE_INDEX
    tix = None if tgt is None else tgt.clamp(min=0)[:, None]
    ce = kd = t_ce = g = None
    log_q = None
    if tgt is not None:
        log_q = torch.log_softmax(s, -1)
        ce = log_q.gather(-1, tix).squeeze(1).neg_().mul_(ok)
    if t is not None and kind == "forward_kl" and temperature == 1.0 and finite_teacher:
        log_q = torch.log_softmax(s, -1) if log_q is None else log_q
        log_p = torch.log_softmax(t, -1)
        if teacher_ce and tgt is not None:
            t_ce = log_p.gather(-1, tix).squeeze(1).neg_().mul_(ok)
        p = log_p.exp()
        kd = torch.linalg.vecdot(p, log_p) - torch.linalg.vecdot(p, log_q)
        if need and ok is None:  # KD alone: a_kd (q - p)
            g = log_q.exp_().sub_(p).mul_(a_kd)
        elif need:
            g = log_q.exp_().mul_((a_ce * ok + a_kd)[:, None]).sub_(p, alpha=a_kd)
            g.scatter_add_(-1, tix, (-a_ce * ok)[:, None].to(g.dtype))
        return ce, kd, t_ce, g
    if log_q is not None and need:  # the CE's gradient, a_ce * (softmax - onehot) on valid rows
        coef = (a_ce * ok)[:, None].to(log_q.dtype)
        g = log_q.exp_().mul_(coef)
        g.scatter_add_(-1, tix, -coef)
    if t is not None:
        if teacher_ce and tgt is not None:
            t_ce = torch.log_softmax(t, -1).gather(-1, tix).squeeze(1).neg_().mul_(ok)
        kd, g_kd = _divergence(s, t, kind, temperature, beta, need_grad=need)
        if g_kd is not None:
            g = g_kd.mul_(a_kd) if g is None else g.add_(g_kd, alpha=a_kd)
    return ce, kd, t_ce, g
