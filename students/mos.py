"""Mixture-of-Students: a shallower PR-MoE derived from the teacher's architecture (DeepSpeed-MoE).

Depth is reduced (24 -> 21 layers in the paper) while the deep, expert-rich MoE layers are kept: the
student's MoE blocks take the expert counts of the teacher's *last* MoE blocks ([32]*10 + [64]*2 ->
[32]*8 + [64]*2). A student is trained from scratch (the paper) or initialised from the teacher.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import replace

import torch

from distill.errors import ConfigError
from distill.kd.internal import default_block_map
from distill.models import ModelConfig
from students.config import StudentConfig

logger = logging.getLogger(__name__)


def student_depth(teacher: ModelConfig, s: StudentConfig) -> int:
    if s.n_layers is not None:
        n = s.n_layers
        key = "student.n_layers"
    else:
        if not 0 < s.depth_ratio <= 1:
            raise ConfigError("student.depth_ratio", f"must be in (0, 1], got {s.depth_ratio}.")
        n = max(1, math.floor(teacher.n_layers * s.depth_ratio + 1e-9))
        key = "student.depth_ratio"
    if not 1 <= n <= teacher.n_layers:
        raise ConfigError(
            key,
            f"gives a student of {n} layers for a teacher of {teacher.n_layers}; a Mixture-of-Students "
            "must be at least 1 layer and no deeper than its teacher.",
            f"set student.n_layers between 1 and {teacher.n_layers}.",
        )
    return n


def derive_student(teacher: ModelConfig, s: StudentConfig, vocab_size: int | None = None) -> ModelConfig:
    """The student's architecture: the teacher's, with fewer layers and the deepest MoE layers' experts."""
    n = student_depth(teacher, s)
    n_moe = sum(teacher.is_moe_block(i) for i in range(n))
    if s.num_experts is not None:
        experts = list(s.num_experts)
        if len(experts) != n_moe:
            raise ConfigError(
                "student.num_experts",
                f"has {len(experts)} entries but a {n}-layer student has {n_moe} MoE blocks.",
                f"give {n_moe} expert counts, or null to keep the teacher's deepest MoE layers.",
            )
    else:
        experts = list(teacher.num_experts[len(teacher.num_experts) - n_moe:]) if n_moe else []
    return replace(
        teacher,
        name=f"{teacher.name}-mos{n}",
        n_layers=n,
        num_experts=experts,
        vocab_size=vocab_size or teacher.vocab_size,
    ).validate()


# For each student block, the teacher block it copies: the same kind (dense / MoE), the deepest kept. The
# same mapping pairs the blocks of hidden-state KD, so it lives with the KD terms.
default_teacher_layers = default_block_map


@torch.no_grad()
def init_student_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module, s: StudentConfig,
                              calibration: Iterable[torch.Tensor] | None = None,
                              kept_out: dict[int, list[int]] | None = None) -> list[int]:
    """Copy embeddings, final norm and the chosen teacher blocks into ``student``; returns the mapping.

    A student MoE block with fewer experts than its teacher block starts from the experts
    ``s.expert_selection`` picks (students/experts.py), scored on ``calibration`` (input-id batches of
    training data) for "importance" and "merge"; ``kept_out`` receives {student block: kept teacher experts}."""
    scfg, tcfg = student.cfg, teacher.cfg
    mapping = list(s.teacher_layers) if s.teacher_layers is not None else default_teacher_layers(tcfg, scfg)
    if len(mapping) != scfg.n_layers:
        raise ConfigError(
            "student.teacher_layers",
            f"has {len(mapping)} entries for a student of {scfg.n_layers} layers.",
            "give one teacher block index per student block.",
        )
    t_blocks, s_blocks = list(teacher.blocks), list(student.blocks)
    for ti in mapping:
        if not 0 <= ti < len(t_blocks):
            raise ConfigError("student.teacher_layers", f"teacher block {ti} does not exist "
                              f"(the teacher has {len(t_blocks)}).")
    shrunk = [si for si, ti in enumerate(mapping) if s_blocks[si].is_moe and t_blocks[ti].is_moe
              and s_blocks[si].ffn.num_experts != t_blocks[ti].ffn.num_experts]
    if shrunk:  # the MoE blocks go through the expert selection, the rest is copied below
        from students.experts import expert_importance, init_student_experts

        stats = None
        if s.expert_selection != "first":
            if calibration is None:
                raise ValueError(f"expert_selection={s.expert_selection!r} needs calibration batches")
            stats = expert_importance(teacher, calibration, max_batches=s.calibration_batches)
        kept = init_student_experts(student, teacher, mapping, s.expert_selection, stats)
        if kept_out is not None:
            kept_out.update(kept)
        for si, experts in kept.items():
            logger.info("student block %d: teacher block %d's experts %s (%s)", si, mapping[si], experts,
                        s.expert_selection)
    for si, ti in enumerate(mapping):
        if shrunk and s_blocks[si].is_moe:
            continue
        t_state, s_block = t_blocks[ti].state_dict(), s_blocks[si]
        mismatch = [k for k, v in s_block.state_dict().items() if k not in t_state or t_state[k].shape != v.shape]
        if mismatch or len(t_state) != len(s_block.state_dict()):
            raise ConfigError(
                "student.teacher_layers",
                f"student block {si} cannot copy teacher block {ti}: different kind or expert count "
                f"(first differing entries: {mismatch[:3]}).",
                "map MoE blocks to MoE blocks with the same number of experts, dense to dense.",
            )
        s_block.load_state_dict(t_state)
    t_rest = {k: v for k, v in teacher.state_dict().items() if not k.startswith("blocks.")}
    s_rest = {k: v for k, v in student.state_dict().items() if not k.startswith("blocks.")}
    for k, v in s_rest.items():
        if t_rest[k].shape != v.shape:
            raise ConfigError("data.tokenizer", f"teacher and student disagree on `{k}` "
                              f"({tuple(t_rest[k].shape)} vs {tuple(v.shape)}).")
        v.copy_(t_rest[k])
    return mapping
