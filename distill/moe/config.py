"""MoE layer configuration (the `model.moe` config node) and the statistics a layer returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class MoEConfig:
    top_k: int = 1
    d_ff: int | None = None  # expert hidden size; None -> the model's d_ff
    activation: str = "gelu"  # "gelu" | "swiglu"
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    renormalize: bool = True  # renormalise the chosen k gate values to sum to 1 (k > 1)
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_policy: str = "probs"  # "probs" | "position" | "random" (random token selection, train only)
    dropless: bool = False
    jitter_eps: float = 0.0  # multiplicative router-input jitter in training (0 = off)
    gumbel_noise: bool = False  # Gumbel noise on the logits for the choice only, training only
    residual: bool = False  # PR-MoE residual: dense MLP + routed experts, mixed per token
    num_shared_experts: int = 0  # always-on dense experts, summed
    aux_free_bias: bool = False  # aux-loss-free balancing bias (DeepSeek-V3 style)
    aux_free_bias_rate: float = 1e-3
    use_grouped_mm: bool = True  # torch.nn.functional.grouped_mm where shapes allow


class MoEStats(NamedTuple):
    """What one MoE layer reports for one forward pass."""

    aux_loss: torch.Tensor  # scalar, differentiable; 1.0 at perfect balance
    z_loss: torch.Tensor  # scalar, differentiable
    tokens_per_expert: torch.Tensor  # [E] long, routed (token, choice) pairs kept per expert
    drop_fraction: torch.Tensor  # scalar, fraction of (token, choice) pairs dropped
