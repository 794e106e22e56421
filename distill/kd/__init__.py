"""Knowledge distillation: the KD losses (`distill.kd.losses`) and the staged-KD schedule with the `kd`
config node (`distill.kd.schedule`).

The losses (forward KL, reverse KL, generalised JSD, all scaled by T^2) are means over valid tokens,
computed chunk by chunk in at least fp32. `KDSchedule(cfg, max_steps)` says at each optimizer step
whether KD is on and with what weight; `KDSchedule.uses_teacher` is False when KD never runs.
`distill.kd.sparse`: the same divergences from a teacher's stored top-k log-probabilities (offline targets),
the rest of the vocabulary as one tail bucket; equal to the dense losses when k is the vocabulary.
"""

from distill.kd.losses import kd_loss, kd_loss_from_config, kl_to_teacher, top1_agreement
from distill.kd.schedule import (
    DECAYS,
    LOSSES,
    KDConfig,
    KDSchedule,
)
from distill.kd.sparse import TopK, sparse_kd_loss, teacher_topk

__all__ = [
    "DECAYS",
    "LOSSES",
    "KDConfig",
    "KDSchedule",
    "TopK",
    "kd_loss",
    "kd_loss_from_config",
    "kl_to_teacher",
    "sparse_kd_loss",
    "teacher_topk",
    "top1_agreement",
]
