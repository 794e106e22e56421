"""Internal KD: losses between the teacher's and the student's routers and hidden states, and their maps.

- `router_kd_loss`: KL(p_teacher_router || p_student_router) per token, p = softmax of the fp32 router
  logits, the teacher's probabilities first moved onto the student's experts through an expert map
  (teacher expert -> student expert, -1 for a dropped expert whose mass is removed; the rest renormalised).
  `router_kd_from_routes` is the same from the teacher's stored top-r routes (offline targets).
- `hidden_kd_loss`: MSE (mean over features) or 1 - cosine similarity between a student block output,
  optionally projected to the teacher's width, and the teacher's.

Both are means over valid tokens. The maps: `default_layer_map` (student MoE layer -> teacher MoE layer,
the deepest teacher MoE layers kept, as `students.mos.derive_student` keeps their expert counts),
`default_block_map` (student block -> teacher block, `students.mos.default_teacher_layers`) and
`expert_map` (teacher expert -> student expert from the teacher experts a student layer kept).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from distill.errors import ConfigError
from distill.models import ModelConfig

if TYPE_CHECKING:
    from distill.kd.schedule import KDConfig


def default_layer_map(n_teacher_moe: int, n_student_moe: int) -> list[int]:
    """The i-th student MoE layer <- the teacher MoE layer at the same depth from the end."""
    return [n_teacher_moe - n_student_moe + i for i in range(n_student_moe)]


def resolve_layer_map(layer_map: Sequence[int] | None, n_teacher_moe: int, n_student_moe: int) -> list[int]:
    """`kd.layer_map` checked against the models (ConfigError naming `kd.layer_map`), or the default map."""
    if layer_map is None:
        if n_student_moe > n_teacher_moe:
            raise ConfigError("kd.layer_map", f"the student has {n_student_moe} MoE layers, the teacher only "
                              f"{n_teacher_moe}: there is no default map.",
                              f"give one teacher MoE-layer index (0..{n_teacher_moe - 1}) per student MoE layer.")
        return default_layer_map(n_teacher_moe, n_student_moe)
    layer_map = list(layer_map)
    if len(layer_map) != n_student_moe:
        raise ConfigError("kd.layer_map", f"has {len(layer_map)} entries for a student with {n_student_moe} "
                          "MoE layers.", "give one teacher MoE-layer index per student MoE layer, or null.")
    bad = [i for i in layer_map if not 0 <= i < n_teacher_moe]
    if bad:
        raise ConfigError("kd.layer_map", f"names teacher MoE layers {bad}, but the teacher has {n_teacher_moe} "
                          f"(0..{n_teacher_moe - 1}).", "use 0-based indices among the teacher's MoE layers.")
    return layer_map


def default_block_map(teacher: ModelConfig, student: ModelConfig) -> list[int]:
    """For each student block, the teacher block of the same kind (dense / MoE), the deepest ones kept
    (the mapping of `students.mos.default_teacher_layers`, which initialises a student from its teacher)."""
    mapping = []
    for moe in (False, True):
        t = [i for i in range(teacher.n_layers) if teacher.is_moe_block(i) == moe]
        s = [i for i in range(student.n_layers) if student.is_moe_block(i) == moe]
        mapping += list(zip(s, t[len(t) - len(s):]))
    return [ti for _, ti in sorted(mapping)]


def expert_map(n_teacher: int, n_student: int, kept: Sequence[int] | None = None) -> list[int]:
    """Teacher expert -> student expert index (-1: dropped). `kept[j]` is the teacher expert the student's
    expert j started from; None keeps the first `n_student` (the default student initialisation)."""
    kept = list(range(n_student)) if kept is None else list(kept)
    if len(kept) != n_student or len(set(kept)) != len(kept) or not all(0 <= e < n_teacher for e in kept):
        raise ValueError(f"an expert map needs {n_student} distinct teacher experts in 0..{n_teacher - 1}, "
                         f"got {kept}")
    out = [-1] * n_teacher
    for j, e in enumerate(kept):
        out[e] = j
    return out


class InternalMaps(NamedTuple):
    layer_map: list[int]  # student MoE layer -> teacher MoE layer (empty when router KD is off and no kd.layer_map)
    expert_maps: list[list[int] | None]  # per entry of layer_map: teacher expert -> student expert / -1; None = same
    block_map: list[int]  # student block -> teacher block (hidden KD)


def resolve_internal_maps(
    kd: KDConfig,
    teacher: ModelConfig,
    student: ModelConfig,
    kept_experts: Mapping[int, Sequence[int]] | None = None,
    teacher_layers: Sequence[int] | None = None,
) -> InternalMaps:
    """The maps of internal KD, checked against the two architectures (ConfigError naming ``kd.layer_map``).

    `kept_experts` {student MoE-layer index: the teacher expert each student expert started from} (a layer
    left out: the first N); `teacher_layers` the teacher block of each student block (None: `default_block_map`).
    """
    t_experts, s_experts = list(teacher.num_experts), list(student.num_experts)
    layer_map = (resolve_layer_map(kd.layer_map, len(t_experts), len(s_experts))
                 if kd.layer_map is not None or kd.router_weight > 0 else [])
    maps: list[list[int] | None] = []
    for j, ti in enumerate(layer_map):
        kept = (kept_experts or {}).get(j)
        n_t, n_s = t_experts[ti], s_experts[j]
        if kept is None and n_s > n_t:
            raise ConfigError("kd.layer_map", f"student MoE layer {j} ({n_s} experts) is mapped to teacher MoE "
                              f"layer {ti}, which has only {n_t}.", "map it to a teacher layer with more experts.")
        maps.append(None if kept is None and n_s == n_t else expert_map(n_t, n_s, kept))
    blocks = list(teacher_layers) if teacher_layers is not None else default_block_map(teacher, student)
    if len(blocks) != student.n_layers or not all(0 <= b < teacher.n_layers for b in blocks):
        raise ValueError(f"teacher_layers {blocks}: need {student.n_layers} teacher blocks in "
                         f"0..{teacher.n_layers - 1}")
    return InternalMaps(layer_map, maps, blocks)


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token values [T] over the tokens where `mask` (any shape of T elements) is true."""
    if mask is None:
        return per_token.mean()
    m = mask.reshape(-1).to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def router_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    expert_map: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over valid tokens of KL(p_t || p_s); logits [T, E_s] and [T, E_t] (fp32 softmax), `mask` of T
    elements (e.g. [B, L] for T = B*L tokens) or None. `expert_map` [E_t]: teacher expert -> student expert
    or -1 (dropped: its mass is removed and the rest renormalised); None needs E_t == E_s (identity)."""
    s_logp = F.log_softmax(student_logits.float(), dim=-1)
    t_logp = F.log_softmax(teacher_logits.float(), dim=-1)
    if expert_map is None:
        if t_logp.shape[-1] != s_logp.shape[-1]:
            raise ValueError(f"teacher router over {t_logp.shape[-1]} experts, student over {s_logp.shape[-1]}: "
                             "give an expert_map")
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(dim=-1)  # exactly 0 for equal logits
    else:
        p_t = t_logp.exp()
        idx = torch.as_tensor(expert_map, device=p_t.device, dtype=torch.long)
        n_s = s_logp.shape[-1]
        idx = torch.where(idx >= 0, idx, n_s)  # dropped experts go to an extra column, cut off below (no sync)
        p_t = p_t.new_zeros(p_t.shape[0], n_s + 1).index_add_(1, idx, p_t)[:, :n_s]
        p_t = p_t / p_t.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p_t.dtype).tiny)
        kl = (torch.xlogy(p_t, p_t) - p_t * s_logp).sum(dim=-1)
    return _masked_mean(kl, mask)


def router_kd_from_routes(
    student_logits: torch.Tensor,
    t_ids: torch.Tensor,
    t_logp: torch.Tensor,
    mask: torch.Tensor | None = None,
    expert_map: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """`router_kd_loss` from the teacher's stored routes (offline targets): its r most probable experts
    `t_ids` [T, r] and their log-probabilities `t_logp` [T, r] (-inf: padding), on r + 1 buckets.

    The teacher's distribution is known on its stored experts; the rest of its mass (1 - their sum, 0 when
    all its experts are stored) is one bucket, matched by the student's mass on the experts not among the
    mapped stored ones (as the sparse logit targets' tail). Stored experts the map drops lose their mass, the
    rest is renormalised, as online; the unknown rest is taken to belong to kept experts (exact when the
    teacher's E experts are all stored, r = E: then this equals `router_kd_loss` up to the storage's rounding).
    `expert_map` [E_t] as in `router_kd_loss`; None: the student has the teacher's experts (E_t = E_s).
    """
    s_logp = F.log_softmax(student_logits.float(), dim=-1)
    n_s = s_logp.shape[-1]
    p = t_logp.float().exp()
    stored = t_logp > float("-inf")
    if expert_map is None:
        n_t, ids = n_s, t_ids.long()
    else:
        emap = torch.as_tensor(expert_map, device=p.device, dtype=torch.long)
        n_t, ids = emap.numel(), emap[t_ids.long()]
    kept = stored & (ids >= 0)
    ids = torch.where(kept, ids, 0)
    q_kept = s_logp.gather(-1, ids)
    covered = torch.zeros_like(s_logp).scatter_add_(-1, ids, kept.to(s_logp.dtype)) > 0
    none_left = covered.all(-1, keepdim=True)  # (its logsumexp would be -inf, with a NaN gradient)
    log_q_rest = s_logp.masked_fill(covered & ~none_left, float("-inf")).logsumexp(-1)  # the student's mass off them
    complete = stored.sum(-1) >= n_t  # every teacher expert stored: no unknown mass
    rest = torch.where(complete | none_left.squeeze(-1), 0.0, (1.0 - p.sum(-1)).clamp_min(0.0))
    p_kept = torch.where(kept, p, 0.0)
    z = (p_kept.sum(-1) + rest).clamp_min(torch.finfo(p.dtype).tiny)
    p_kept, rest = p_kept / z[:, None], rest / z
    kl = (torch.xlogy(p_kept, p_kept) - torch.where(kept, p_kept * q_kept, 0.0)).sum(-1)
    kl = kl + torch.xlogy(rest, rest) - torch.where(rest > 0, rest * log_q_rest, 0.0)
    return _masked_mean(kl, mask)


def hidden_kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: str = "mse",
    proj: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Mean over valid tokens of the distance between the student's hidden states [..., d_s] (through
    `proj` to the teacher's width when given) and the teacher's [..., d_t], in fp32: "mse" (mean squared
    error over the features) or "cosine" (1 - cosine similarity). `mask` has one element per token."""
    h = proj(student_hidden) if proj is not None else student_hidden
    h, t = h.float().reshape(-1, h.shape[-1]), teacher_hidden.float().reshape(-1, teacher_hidden.shape[-1])
    if kind == "mse":
        per_token = (h - t).square().mean(dim=-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(h, t, dim=-1)
    else:
        raise ValueError(f"unknown hidden KD loss {kind!r}; use 'mse' or 'cosine'")
    return _masked_mean(per_token, mask)
