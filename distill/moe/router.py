"""Top-k router: fp32 scores, train-only noise, gate values, load-balancing and z losses.

The router only chooses; capacity and token movement are the layer's job.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from distill.moe.config import MoEConfig


class Routing(NamedTuple):
    expert_idx: torch.Tensor  # [T, k] long, chosen global expert ids
    gates: torch.Tensor  # [T, k] fp32 gate values from the clean probabilities
    choice_counts: torch.Tensor  # [E] long, (token, choice) pairs per expert before capacity
    aux_loss: torch.Tensor  # scalar, E * sum_e f_e * P_e (1.0 at perfect balance)
    z_loss: torch.Tensor  # scalar, mean(logsumexp(logits)^2)
    logits: torch.Tensor | None = None  # [T, E] fp32 logits before any noise, only when asked (`return_logits`)


class Router(nn.Module):
    """`logits = x @ W_g` in fp32 -> softmax or sigmoid scores -> top-k experts per token.

    Training-only noise: multiplicative jitter on the router input (`jitter_eps`), Gumbel noise on the
    logits for the choice only (`gumbel_noise`). With `aux_free_bias`, a per-expert bias (buffer
    `balance_bias`) is added to the scores for the choice only; the choice counts of training passes
    accumulate in the buffer `balance_counts` until the layer updates the bias.

    Family options (docs in MoEConfig): `router_bias` (a parameter `bias` [E] in the logits, GPT-OSS),
    group-limited routing (`n_group`, `topk_group`, `group_score`: only the experts of each token's best
    groups can be chosen, DeepSeek-V2/V3), `renormalize_top1` and `routed_scaling_factor` on the gates.
    DeepSeek-V3's `e_score_correction_bias` is `balance_bias`: sigmoid scores plus the bias choose the
    experts (and the groups), the gates are the unbiased scores (transformers' DeepseekV3TopkRouter).
    """

    def __init__(self, d_model: int, num_experts: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = cfg.top_k
        self.score_func = cfg.score_func
        self.renormalize = cfg.renormalize
        self.jitter_eps = cfg.jitter_eps
        self.gumbel_noise = cfg.gumbel_noise
        self.renormalize_top1 = cfg.renormalize_top1
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.n_group, self.topk_group, self.group_score = cfg.n_group or 1, cfg.topk_group, cfg.group_score
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if cfg.router_bias else None
        bias, counts = (
            (torch.zeros(num_experts), torch.zeros(num_experts)) if cfg.aux_free_bias else (None, None)
        )
        self.register_buffer("balance_bias", bias)
        self.register_buffer("balance_counts", counts, persistent=False)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] fp32 -> fp32 logits [T, E]."""
        return F.linear(x, self.weight.float(), None if self.bias is None else self.bias.float())

    def limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """choice [T, E] with the experts outside each token's `topk_group` best groups set to -inf; a
        group's score is the sum of its best two choice scores ("top2_sum") or its best one ("max")."""
        groups = choice.unflatten(-1, (self.n_group, -1))  # [T, G, E/G]
        if self.group_score == "top2_sum":
            score = groups.topk(2, dim=-1).values.sum(dim=-1)
        else:
            score = groups.amax(dim=-1)
        best = score.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, best, True)
        return groups.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()

    def forward(self, x: torch.Tensor, return_logits: bool = False) -> Routing:
        """x [T, d] -> Routing; with `return_logits` it also holds the logits of the clean input (computed
        again without the jitter when the jitter is on)."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            clean = None
            if self.training and self.jitter_eps > 0:
                if return_logits:
                    clean = self.logits(x)
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            logits = self.logits(x)
            if return_logits and clean is None:
                clean = logits
            probs = self.scores(logits)
            choice = probs
            if self.training and self.gumbel_noise:  # -log(Exp(1)) is a standard Gumbel sample
                choice = self.scores(logits.detach() - torch.empty_like(logits).exponential_().log())
            if self.balance_bias is not None:
                choice = choice.detach() + self.balance_bias
            if self.n_group > 1:
                choice = self.limit_groups(choice)
            if self.top_k == 1:  # max is several times faster than topk on CPU
                expert_idx = choice.argmax(dim=-1, keepdim=True)
            else:
                expert_idx = choice.topk(self.top_k, dim=-1).indices
            gates = probs.gather(-1, expert_idx)
            if self.renormalize and (self.top_k > 1 or self.renormalize_top1):
                gates = gates / gates.sum(dim=-1, keepdim=True)
            if self.routed_scaling_factor != 1.0:
                gates = gates * self.routed_scaling_factor
            counts = torch.bincount(expert_idx.flatten(), minlength=self.num_experts)
            if self.training and self.balance_bias is not None and torch._C._current_graph_task_id() == -1:
                self.balance_counts += counts  # once per forward: not again when a backward recomputes it
            # Switch load balancing, normalised over T*k pairs so that perfect balance gives 1.0 for any k
            # (sigmoid scores are normalised per token first, as in DeepSeek-V3).
            frac = counts.float() / expert_idx.numel()
            p = probs if self.score_func == "softmax" else probs / probs.sum(dim=-1, keepdim=True)
            aux = self.num_experts * (frac * p.mean(dim=0)).sum()
            z = torch.logsumexp(logits, dim=-1).square().mean()
        return Routing(expert_idx, gates, counts, aux, z, clean)
