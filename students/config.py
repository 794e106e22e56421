"""How a Mixture-of-Students is derived from its teacher (the `student` config node)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from distill.errors import ConfigError

INITS = ("scratch", "teacher")
SELECTIONS = ("first", "importance", "merge")


@dataclass
class StudentConfig:
    # Depth: n_layers if set, else round(teacher layers * depth_ratio) (the paper: 24 -> 21 = 0.875).
    n_layers: Optional[int] = None
    depth_ratio: float = 0.875
    # Experts per student MoE layer; None keeps the teacher's deepest (expert-rich) MoE layers,
    # e.g. teacher [32]*10 + [64]*2 -> student [32]*8 + [64]*2 (DeepSpeed-MoE's MoS).
    num_experts: Optional[List[int]] = None
    # "scratch" (the paper) or "teacher": copy embeddings, final norm and a subset of teacher blocks.
    init: str = "scratch"
    # init=teacher: the teacher block index for each student block; None = keep the deepest blocks.
    teacher_layers: Optional[List[int]] = None
    # init=teacher with fewer experts than the teacher's block: which experts the student starts from
    # (students/experts.py): "first" (the first N), "importance" (REAP: top N by gate x output norm over a
    # calibration pass on training data), "merge" (importance, dropped experts merged into kept ones).
    expert_selection: str = "first"
    calibration_batches: int = 8  # training batches of the calibration pass (importance, merge)

    def validate(self) -> StudentConfig:
        """The values no derivation checks (depth and expert counts are checked by `derive_student`)."""
        if self.init not in INITS:
            raise ConfigError("student.init", f"unknown value {self.init!r}.", f"use one of {', '.join(INITS)}.")
        if self.expert_selection not in SELECTIONS:
            raise ConfigError("student.expert_selection", f"unknown value {self.expert_selection!r}.",
                              f"use one of {', '.join(SELECTIONS)}.")
        if self.calibration_batches < 1:
            raise ConfigError("student.calibration_batches", f"must be >= 1, got {self.calibration_batches}.",
                              "e.g. 8.")
        return self
