"""The MoE layer: route, sort (token, choice) pairs by global expert, apply capacity, dispatch to the
local experts, combine with the gate values; optional residual dense MLP and shared experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill.moe.config import MoEConfig, MoEStats
from distill.moe.dispatch import LocalDispatcher, TokenDispatcher
from distill.moe.experts import MLP, GroupedExperts
from distill.moe.router import Router, Routing


def sort_by_expert(
    expert_idx: torch.Tensor, counts: torch.Tensor, priority: torch.Tensor | None, capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the T*k (token, choice) pairs (flat index t*k + j) by expert and apply capacity.

    Within an expert, pairs are ranked by descending `priority` (None: token order); with a `capacity`,
    each expert keeps its first `capacity` pairs. Returns `order` [M] (the kept pairs' flat indices,
    sorted by expert), `inverse` [T*k] (each pair's position in `order`, M for a dropped pair) and the
    kept counts per expert [E].
    """
    flat = expert_idx.flatten()
    if priority is None:
        order = flat.argsort(stable=True)
    else:
        by_priority = priority.argsort(descending=True, stable=True)
        order = by_priority[flat[by_priority].argsort(stable=True)]
    if capacity is not None:
        starts = counts.cumsum(0) - counts
        rank = torch.arange(flat.numel(), device=flat.device)
        rank -= starts.repeat_interleave(counts, output_size=flat.numel())
        order = order[rank < capacity]
        counts = counts.clamp(max=capacity)
    positions = torch.arange(order.numel(), device=order.device)
    inverse = torch.full_like(flat, order.numel()).scatter_(0, order, positions)
    return order, inverse, counts


def _gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """src[index], where index == len(src) (only present when index is longer than src) gives zeros."""
    if index.numel() > src.shape[0]:
        src = torch.cat([src, src.new_zeros(1, src.shape[1])])
    return src.index_select(0, index)


class _SortRows(torch.autograd.Function):
    """rows = x[order // k]: each kept pair's token, in sorted order. The backward gathers with
    `inverse` and sums each token's k rows, instead of index_select's scatter-add (slow on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order.div(k, rounding_mode="floor") if k > 1 else order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        grad_x = _gather_rows(grad.contiguous(), inverse)
        if ctx.k > 1:
            grad_x = grad_x.view(-1, ctx.k, grad.shape[1]).sum(dim=1)
        return grad_x, None, None, None


class _UnsortRows(torch.autograd.Function):
    """pairs = out[inverse]: expert outputs back in (token, choice) order, zero rows for dropped pairs.
    The map is one-to-one on kept pairs, so the backward is a gather with `order`."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, inverse: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        return _gather_rows(out, inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None, None


class MoELayer(nn.Module):
    """Mixture-of-Experts FFN: `forward(x [..., d]) -> (y [..., d], MoEStats)` (see docs/architecture.md, "MoE layer").

    Submodules: `router`, `experts` (GroupedExperts, the only expert parameters), `mlp` and `coef`
    (residual), `shared_mlp` (the shared experts as one dense MLP of width num_shared_experts * d_ff,
    which equals the sum of that many experts, or `shared_d_ff`) and its optional sigmoid gate
    `shared_gate`. `dispatcher` moves tokens to the experts; an expert-parallel strategy replaces it
    (and slices `experts`). DeepSeek-V2/V3 and GPT-OSS layers are option sets of `cfg`
    (`distill.moe.families.moe_options_from_hf`).

    `cfg` is used as given: its checks (`MoEConfig.validate`) run once per run, before any model is built.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = cfg.top_k
        d_ff = cfg.d_ff if cfg.d_ff is not None else d_ff
        self.router = Router(d_model, num_experts, cfg)
        act = dict(swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha)
        self.experts = GroupedExperts(
            num_experts, d_model, d_ff, cfg.activation, cfg.use_grouped_mm, bias=cfg.expert_bias, **act
        )
        self.mlp = MLP(d_model, d_ff, cfg.activation, **act) if cfg.residual else None
        self.coef = nn.Linear(d_model, 2) if cfg.residual else None
        self.shared_mlp = (
            MLP(d_model, cfg.shared_d_ff or cfg.num_shared_experts * d_ff, cfg.activation, **act)
            if cfg.num_shared_experts
            else None
        )
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_gate else None
        self.dispatcher: TokenDispatcher = LocalDispatcher()
        self.init_weights(0.02, 0.02)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """N(0, std) for input projections and the router, N(0, out_std) for output projections."""
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.mlp is not None:
            self.mlp.init_weights(std, out_std)
            nn.init.normal_(self.coef.weight, std=std)
            nn.init.zeros_(self.coef.bias)
        if self.shared_mlp is not None:
            self.shared_mlp.init_weights(std, out_std)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=std)

    def capacity(self, num_tokens: int) -> int | None:
        """Pairs each expert may keep: max(min_capacity, ceil(k * cf * T / E)), at most T; None when
        nothing can be dropped (dropless, or the capacity reaches T)."""
        if self.cfg.dropless:
            return None
        cf = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        cap = max(self.cfg.min_capacity, math.ceil(self.top_k * cf * num_tokens / self.num_experts))
        return cap if cap < num_tokens else None

    def drop_priority(self, routing: Routing) -> torch.Tensor | None:
        """Rank of pairs within an expert when it overflows: gate value, token position, or random."""
        policy = self.cfg.drop_policy
        if policy == "random" and not self.training:
            policy = "probs"  # eval is deterministic
        if policy == "probs":
            return routing.gates.detach().flatten()
        if policy == "random":
            return torch.rand(routing.gates.numel(), device=routing.gates.device)
        return None

    def forward(self, x: torch.Tensor, return_router_logits: bool = False) -> tuple[torch.Tensor, MoEStats]:
        """x [..., d] -> (y [..., d], MoEStats); with `return_router_logits` the stats hold the router's
        clean fp32 logits [T, E] (T: x's leading dimensions flattened)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        num_pairs = x.shape[0] * self.top_k
        routing = self.router(x, return_logits=True) if return_router_logits else self.router(x)
        capacity = self.capacity(x.shape[0])
        priority = self.drop_priority(routing) if capacity is not None else None
        order, inverse, counts = sort_by_expert(routing.expert_idx, routing.choice_counts, priority, capacity)
        rows = _SortRows.apply(x, order, inverse, self.top_k)
        rows, local_counts, handle = self.dispatcher.dispatch(rows, counts)
        out = self.dispatcher.combine(self.experts(rows, local_counts), handle)
        pairs = _UnsortRows.apply(out, inverse, order)  # [T*k, d]
        gates = routing.gates.to(out.dtype)  # [T, k]
        if self.top_k == 1:
            y = pairs * gates
        else:
            y = torch.bmm(gates.unsqueeze(1), pairs.view(-1, self.top_k, pairs.shape[1])).squeeze(1)
        if self.mlp is not None:
            c = F.softmax(self.coef(x), dim=-1)
            y = y * c[:, :1] + self.mlp(x) * c[:, 1:]
        if self.shared_mlp is not None:
            shared = self.shared_mlp(x)
            if self.shared_gate is not None:
                shared = shared * torch.sigmoid(self.shared_gate(x))
            y = y + shared
        stats = MoEStats(
            aux_loss=routing.aux_loss,
            z_loss=routing.z_loss,
            tokens_per_expert=counts,
            drop_fraction=1.0 - counts.sum().float() / num_pairs,
            router_logits=routing.logits,
        )
        return y.reshape(shape), stats

    @torch.no_grad()
    def update_balance_bias(self) -> None:
        """Aux-loss-free balancing: move each expert's bias by `aux_free_bias_rate` toward the mean load
        (up if it got fewer pairs than average since the last call, down if more), then reset the
        counts. Called before each optimizer step; a no-op without `aux_free_bias`. Under data
        parallelism, all-reduce `router.balance_counts` before calling."""
        if self.router.balance_bias is None:
            return
        counts = self.router.balance_counts
        self.router.balance_bias += self.cfg.aux_free_bias_rate * torch.sign(counts.mean() - counts)
        counts.zero_()
