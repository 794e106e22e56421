"""Knowledge-distillation losses and the staged-KD schedule (the `kd` config node).

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
`-inf` logits (masked vocabulary entries) are safe: a term with zero weight contributes 0, so an entry
where both models put -inf adds nothing. A distribution that puts mass where the one it is measured
against has none gives an infinite KL, as the math says (forward KL: student -inf where the teacher
has mass; reverse KL: the other way round); JSD is always finite.

Staged KD: `KDSchedule(cfg, max_steps)` says at each optimizer step (Lightning's 0-based
`global_step`) whether KD is on and with what weight. KD is on for step < stop_step; stop_step 0 means
KD is never on (`conf/kd/none.yaml`); no stop step means KD for the whole run (`conf/kd/full.yaml`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError
from torch.autograd.function import once_differentiable

from distill.errors import ConfigError

LOSSES = ("forward_kl", "reverse_kl", "jsd")
DECAYS = ("none", "linear", "cosine")


def _check_loss_args(loss: str, temperature: float, beta: float, chunk_size: int) -> None:
    if loss not in LOSSES:
        raise ConfigError("kd.loss", f"unknown KD loss {loss!r}.", f"use one of {', '.join(LOSSES)}.")
    if not 0 < temperature < math.inf:
        raise ConfigError("kd.temperature", f"must be > 0 and finite, got {temperature}.", "e.g. 1.0.")
    if not 0 < beta < 1:
        raise ConfigError("kd.beta", f"JSD beta must be in (0, 1), got {beta}.", "e.g. 0.5 (symmetric JSD).")
    if chunk_size < 1:
        raise ConfigError("kd.chunk_size", f"must be >= 1 token, got {chunk_size}.", "e.g. 1024.")


@dataclass
class KDConfig:
    loss: str = "forward_kl"  # "forward_kl" | "reverse_kl" | "jsd"
    temperature: float = 1.0
    beta: float = 0.5  # JSD only: teacher weight in the mixture
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    # KD is on for global_step < stop_step (0 = never on), or stops at round(stop_fraction * max_steps);
    # at most one of the two; neither = KD for the whole run. (typing.Optional for OmegaConf, as asked.)
    stop_step: Optional[int] = None  # noqa: UP045
    stop_fraction: Optional[float] = None  # noqa: UP045
    decay: str = "none"  # "none" | "linear" | "cosine": kd_weight decays to 0 at the stop step
    chunk_size: int = 1024  # tokens per chunk of the loss computation

    def __post_init__(self) -> None:
        _check_loss_args(self.loss, self.temperature, self.beta, self.chunk_size)
        for key in ("kd_weight", "ce_weight"):
            value = getattr(self, key)
            if not 0 <= value < math.inf:
                raise ConfigError(f"kd.{key}", f"must be >= 0 and finite, got {value}.")
        if self.stop_step is not None and self.stop_fraction is not None:
            raise ConfigError(
                "kd.stop_fraction",
                f"both kd.stop_step ({self.stop_step}) and kd.stop_fraction ({self.stop_fraction}) are set.",
                "set one of them to null.",
            )
        if self.stop_step is not None and self.stop_step < 0:
            raise ConfigError(
                "kd.stop_step", f"must be >= 0, got {self.stop_step}.", "0 means KD never runs."
            )
        if self.stop_fraction is not None and not 0 < self.stop_fraction <= 1:
            raise ConfigError(
                "kd.stop_fraction",
                f"must be in (0, 1], got {self.stop_fraction}.",
                "e.g. 0.7; for no KD at all use kd.stop_step=0 (kd=none).",
            )
        if self.decay not in DECAYS:
            raise ConfigError(
                "kd.decay", f"unknown decay {self.decay!r}.", f"use one of {', '.join(DECAYS)}."
            )
        if self.decay != "none" and self.stop_step is None and self.stop_fraction is None:
            raise ConfigError(
                "kd.decay",
                f"decay {self.decay!r} goes to 0 at the KD stop step, but no stop step is set.",
                "set kd.stop_step or kd.stop_fraction, or kd.decay=none.",
            )


def as_kd_config(cfg: KDConfig | Mapping[str, Any] | None) -> KDConfig:
    """A validated KDConfig from a KDConfig, a (Dict)Config node such as `cfg.kd`, or None (defaults)."""
    if isinstance(cfg, KDConfig):
        return cfg
    try:
        node = OmegaConf.merge(OmegaConf.structured(KDConfig), cfg or {})
    except (ConfigKeyError, ValidationError) as err:
        raise ConfigError(
            f"kd.{err.full_key}", err.msg, "see distill.kd.KDConfig for the keys and types."
        ) from None
    return OmegaConf.to_object(node)  # runs KDConfig.__post_init__


class KDSchedule:
    """When KD is on and with what weight, per optimizer step (0-based `global_step`).

    `max_steps` is trainer.max_steps; None or negative (Lightning's "no limit") is allowed unless
    kd.stop_fraction needs it.
    """

    def __init__(self, cfg: KDConfig | Mapping[str, Any] | None, max_steps: int | None):
        self.cfg = cfg = as_kd_config(cfg)
        self.max_steps = max_steps if max_steps is not None and max_steps >= 0 else None
        if cfg.stop_step is not None:
            stop, key = cfg.stop_step, "kd.stop_step"
        elif cfg.stop_fraction is not None:
            if self.max_steps is None:
                raise ConfigError(
                    "kd.stop_fraction",
                    "a fraction of the run needs trainer.max_steps, which is not set.",
                    "set trainer.max_steps, or use kd.stop_step.",
                )
            stop, key = round(cfg.stop_fraction * self.max_steps), "kd.stop_fraction"
        else:
            stop, key = None, ""
        if stop is not None and self.max_steps is not None and stop > self.max_steps:
            raise ConfigError(
                key,
                f"KD stop step beyond trainer.max_steps ({stop} > {self.max_steps}).",
                "lower the KD stop step or raise trainer.max_steps (null stop = KD all the way).",
            )
        self.stop_step: int | None = stop

    def active(self, step: int) -> bool:
        """Whether the KD term (and the teacher) is used at this optimizer step."""
        return self.stop_step is None or step < self.stop_step

    def weight(self, step: int) -> float:
        """The KD weight at this step: kd_weight, decayed to 0 at the stop step; 0 when inactive."""
        if not self.active(step):
            return 0.0
        w = self.cfg.kd_weight
        if self.cfg.decay == "none":
            return w
        frac = step / self.stop_step  # decay != "none" implies a stop step (checked in KDConfig)
        if self.cfg.decay == "linear":
            return w * (1.0 - frac)
        return w * 0.5 * (1.0 + math.cos(math.pi * frac))


# ---------------------------------------------------------------------------------------------------
# losses


def _weighted_log_ratio(w: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_v w_v * (log_a_v - log_b_v) over the last dim (w >= 0), a term being 0 wherever w_v == 0."""
    return (log_a - log_b).mul_(w).masked_fill_(w == 0, 0.0).sum(-1)


def _divergence(
    student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float, beta: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token loss [c] and, if need_grad, its gradient w.r.t. the student logits [c, V].

    Inputs are float logits [c, V] (fresh chunk copies: they may be overwritten). With s = student / T
    and q = p_s, d/ds of KL(p_t || q) is q - p_t; of sum q * g (g = log q - log r, r fixed) it is
    q * (g - sum q * g); JSD's gradient is (1 - beta) times the latter with r = m (the terms through
    m cancel).
    """
    if temperature != 1.0:
        student, teacher = student.div_(temperature), teacher.div_(temperature)
    log_ps, log_pt = torch.log_softmax(student, dim=-1), torch.log_softmax(teacher, dim=-1)
    pt = log_pt.exp()
    grad = None
    if kind == "forward_kl":
        loss = _weighted_log_ratio(pt, log_pt, log_ps)
        if need_grad:
            grad = log_ps.exp().sub_(pt)
    else:
        ps = log_ps.exp()
        if kind == "reverse_kl":
            log_r, scale = log_pt, 1.0
        else:  # jsd
            log_r, scale = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta)), 1.0 - beta
        ks = _weighted_log_ratio(ps, log_ps, log_r)
        loss = ks if kind == "reverse_kl" else beta * _weighted_log_ratio(pt, log_pt, log_r) + scale * ks
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
    backward pass only scales it: no second pass of softmaxes over the vocabulary.
    """

    @staticmethod
    def forward(ctx, student, teacher, rows, kind, temperature, beta, chunk_size):  # type: ignore[override]
        dtype = _compute_dtype(student, teacher)
        need_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=dtype, device=student.device)
        grad = torch.zeros_like(student) if need_grad else None
        for idx in rows.split(chunk_size):
            s, t = student.index_select(0, idx).to(dtype), teacher.index_select(0, idx).to(dtype)
            loss, g = _divergence(s, t, kind, temperature, beta, need_grad=need_grad)
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
        return grad * (grad_out / ctx.n).to(grad.dtype), None, None, None, None, None, None


def _flatten(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-D views [N, V] of both logits and the indices of the valid tokens."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
        raise ValueError(
            f"student and teacher logits must have the same shape [..., V]; got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    vocab = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    if mask is None:
        rows = torch.arange(student.shape[0], device=student.device)
    else:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != logits shape without vocab {tuple(student_logits.shape[:-1])}"
            )
        rows = mask.reshape(-1).to(device=student.device, dtype=torch.bool).nonzero().squeeze(1)
    return student, teacher, rows


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
    logits' shape without V, True (nonzero) = valid. Only `student_logits` gets a gradient.
    """
    _check_loss_args(loss, temperature, beta, chunk_size)
    student, teacher, rows = _flatten(student_logits, teacher_logits.detach(), mask)
    return _ChunkedKD.apply(student, teacher, rows, loss, float(temperature), float(beta), int(chunk_size))


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
    """Fraction of valid tokens where student and teacher argmax agree (0 if no token is valid)."""
    student, teacher, rows = _flatten(student_logits, teacher_logits, mask)
    agree = (student.argmax(-1) == teacher.argmax(-1)).index_select(0, rows)
    return agree.float().sum() / max(rows.numel(), 1)
