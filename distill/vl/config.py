"""The `student` and `teacher` nodes of `task=vl`, and how the VL student and the dense baseline are derived.

A VL Mixture-of-Students keeps the teacher's width, heads and expert pools and drops layers (the paper's
Base -> Small goes 12 -> 8); the dense baseline is the teacher with every MoE FFN dense (`moe_every = 0`),
so that a token's active parameters match the teacher's (the routers aside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional  # noqa: UP035 (OmegaConf structured-config schema)

from distill.errors import ConfigError
from distill.models.vl_config import VLMoEConfig


@dataclass
class VLStudentConfig:
    """Depth: `n_layers` if set, else round(teacher layers * depth_ratio); the student keeps min(F, n_layers)
    VL layers (F: the teacher's `n_vl_layers`) unless `n_vl_layers` is set."""

    n_layers: Optional[int] = None  # noqa: UP045
    depth_ratio: float = 0.5
    n_vl_layers: Optional[int] = None  # noqa: UP045


@dataclass
class VLTeacherConfig:
    """`teacher.path`: the `teacher/export` directory of an earlier `task=vl` run (its pretraining is then
    skipped); null: the pipeline pretrains the teacher."""

    path: Optional[str] = None  # noqa: UP045


def derive_vl_student(teacher: VLMoEConfig, s: VLStudentConfig) -> VLMoEConfig:
    """The student's config: fewer layers, the same pools; ConfigError naming `student.*`."""
    if s.n_layers is not None:
        n, key = s.n_layers, "student.n_layers"
    else:
        if not 0 < s.depth_ratio < 1:
            raise ConfigError("student.depth_ratio", f"must be in (0, 1), got {s.depth_ratio}.", "e.g. 0.5.")
        n, key = max(1, round(teacher.n_layers * s.depth_ratio)), "student.depth_ratio"
    if not isinstance(n, int) or not 1 <= n < teacher.n_layers:
        raise ConfigError(key, f"a student has fewer layers than its teacher ({teacher.n_layers}); this gives {n}.",
                          f"use 1 to {teacher.n_layers - 1} layers.")
    f = s.n_vl_layers if s.n_vl_layers is not None else min(teacher.n_vl_layers, n)
    if not isinstance(f, int) or not 0 <= f <= n:
        raise ConfigError("student.n_vl_layers", f"must be in [0, {n}] (the student's layers), got {f}.")
    student = replace(teacher, name=f"{teacher.name}_student{n}", n_layers=n, n_vl_layers=f)
    if teacher.num_moe_blocks and not student.num_moe_blocks:
        raise ConfigError(key, f"a {n}-layer student of {teacher.name} has no MoE block (one every "
                          f"{teacher.moe_every} layers).", f"use at least {teacher.moe_every} layers.")
    return student.validate()


def dense_baseline(teacher: VLMoEConfig) -> VLMoEConfig:
    """The teacher with dense V/T FFNs in place of its MoE pools: the same active parameters per token."""
    return replace(teacher, name=f"{teacher.name}_dense", moe_every=0).validate()


def check_teacher_path(path: str | None) -> Path | None:
    """The export directory `teacher.path` names, checked before anything is written."""
    if path is None:
        return None
    from distill.vl.export import read_vl_config

    p = Path(path).expanduser()
    read_vl_config(p)  # raises ConfigError("teacher.path", ...) unless it is a VL-MoE export
    return p


@dataclass
class DownstreamConfig:
    """The `downstream` node: fine-tuning steps, batch sizes and the AdamW settings of both tasks."""

    vqa_steps: int = 300
    retrieval_steps: int = 300
    batch_size: int = 64  # >= 2: the retrieval loss contrasts each pair with the rest of its batch
    lr: float = 1e-3
    weight_decay: float = 0.01
    eval_batch_size: int = 256
    seed: int = 0

    def validate(self) -> DownstreamConfig:
        """Raise ConfigError naming the first bad key (`downstream.*`); return self."""
        for key, low in (("vqa_steps", 0), ("retrieval_steps", 0), ("batch_size", 2), ("eval_batch_size", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"downstream.{key}", f"must be an integer >= {low}, got {value!r}.",
                                  f"e.g. downstream.{key}={getattr(DownstreamConfig, key)}.")  # fmt: skip
        if not 0 < self.lr < math.inf:
            raise ConfigError("downstream.lr", f"must be > 0 and finite, got {self.lr!r}.", "e.g. 1e-3.")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError("downstream.weight_decay", f"must be >= 0 and finite, got {self.weight_decay!r}.",
                              "e.g. 0.01 (0 turns it off).")  # fmt: skip
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError("downstream.seed", f"must be an integer, got {self.seed!r}.", "e.g. 0.")
        return self
