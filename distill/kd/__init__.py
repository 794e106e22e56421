"""Knowledge distillation: the KD losses (`distill.kd.losses`) and the staged-KD schedule with the `kd`
config node (`distill.kd.schedule`).

The losses (forward KL, reverse KL, generalised JSD, all scaled by T^2) are means over valid tokens,
computed chunk by chunk in at least fp32. `KDSchedule(cfg, max_steps)` says at each optimizer step
whether KD is on and with what weight; `KDSchedule.uses_teacher` is False when KD never runs.
`distill.kd.sparse`: the same divergences from a teacher's stored top-k log-probabilities (offline targets),
the rest of the vocabulary as one tail bucket; equal to the dense losses when k is the vocabulary.
`distill.kd.internal`: router KD and hidden-state KD between mapped layers, and the default maps.
`distill.kd.fused`: the fused, chunked LM head and loss (CE with any of these KD losses, from hidden states and
the head weight; the full logits never exist), used in training.
"""

from distill.kd.fused import FusedTerms, TeacherHidden, fused_head_from_config, fused_head_loss
from distill.kd.internal import (
    InternalMaps,
    default_block_map,
    default_layer_map,
    expert_map,
    hidden_kd_loss,
    resolve_internal_maps,
    resolve_layer_map,
    router_kd_loss,
)
from distill.kd.losses import kd_loss, kd_loss_from_config, kl_to_teacher, top1_agreement
from distill.kd.schedule import (
    DECAYS,
    HIDDEN_LOSSES,
    LOSSES,
    TEACHER_TARGETS,
    KDConfig,
    KDSchedule,
)
from distill.kd.sparse import TopK, sparse_kd_loss, teacher_topk

__all__ = [
    "DECAYS",
    "FusedTerms",
    "HIDDEN_LOSSES",
    "InternalMaps",
    "LOSSES",
    "TEACHER_TARGETS",
    "TeacherHidden",
    "KDConfig",
    "KDSchedule",
    "TopK",
    "default_block_map",
    "default_layer_map",
    "expert_map",
    "fused_head_from_config",
    "fused_head_loss",
    "hidden_kd_loss",
    "kd_loss",
    "kd_loss_from_config",
    "kl_to_teacher",
    "resolve_internal_maps",
    "resolve_layer_map",
    "router_kd_loss",
    "sparse_kd_loss",
    "teacher_topk",
    "top1_agreement",
]
