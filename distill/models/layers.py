"""The decoder's building blocks: the KV cache, norms, attention, the dense MLP, the block.

Pre-norm LayerNorm or RMSNorm, causal attention through `scaled_dot_product_attention` (grouped-query
when `n_kv_heads` < `n_heads`), a GELU or SwiGLU dense MLP; a block's FFN is an MoE layer when it is given
an expert count. Every module takes a ModelConfig as given (checked once per run by `ModelConfig.validate`).
Rotary tables live in `distill.models.rope`; the attention options of other layouts (q/k norms, sliding
windows, sinks; all off by default) in `distill.models.attention_ext`; `model.mla` swaps in DeepSeek's
multi-head latent attention (`distill.models.mla`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.models.attention_ext import attention_mask, norm_qk, sink_attention
from distill.models.cache import KVCache
from distill.models.config import ModelConfig
from distill.models.mla import MLACache, MultiHeadLatentAttention
from distill.models.rope import apply_rope, rope_tables
from distill.moe import MoELayer, MoEStats
from distill.moe.experts import activate, in_width

__all__ = ["MLP", "Block", "CausalSelfAttention", "KVCache", "RMSNorm", "apply_rope", "make_norm", "rope_tables"]

# ----------------------------------------------------------------------------------------------------
# modules, in the order data flows through them


def _init_linear(linear: nn.Linear, std: float) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class RMSNorm(nn.Module):
    """x / rms(x) computed in fp32, cast back to the input dtype, then scaled (Llama / Mixtral convention)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        # q, k, v projections fused and grouped by key/value head: for each KV head g, the rows of its
        # n_heads / n_kv_heads query heads, then k_g, then v_g (head_dim rows each). A contiguous slice of
        # whole groups is the attention of those heads alone (a tensor-parallel rank's share), so the
        # forward below infers the number of groups from the tensor it gets.
        self.group = self.n_heads // self.n_kv_heads
        width = self.n_heads * cfg.head_dim
        self.c_attn = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(width, cfg.d_model, bias=cfg.out_bias)
        # options (attention_ext), None / off by default
        self.window = cfg.attn_window(layer_idx)
        self.qk_per_head = cfg.qk_norm == "head"
        self.q_norm = self.k_norm = None
        if cfg.qk_norm is not None:
            q_width, k_width = (cfg.head_dim, cfg.head_dim) if self.qk_per_head else (width, cfg.kv_heads * cfg.head_dim)
            self.q_norm, self.k_norm = RMSNorm(q_width, cfg.norm_eps), RMSNorm(k_width, cfg.norm_eps)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads)) if cfg.attn_sinks else None

    def init_weights(self, std: float, out_std: float) -> None:
        _init_linear(self.c_attn, std)
        _init_linear(self.c_proj, out_std)
        if self.q_norm is not None:
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()
        if self.sinks is not None:
            nn.init.normal_(self.sinks, std=std)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, L, _ = x.shape
        qkv = self.c_attn(x).view(B, L, -1, self.group + 2, self.head_dim)
        q, k, v = qkv.split([self.group, 1, 1], dim=3)
        if self.q_norm is not None:
            q, k = norm_qk(q, k, self.q_norm, self.k_norm, self.qk_per_head)
        q, k, v = (t.reshape(B, L, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # a no-op unless autocast runs over an fp32 cache
        dropout = self.dropout if self.training else 0.0
        if self.sinks is not None or self.window is not None:
            mask = attention_mask(start, L, self.window, x.device)
            if self.sinks is not None:
                y = sink_attention(q, k, v, mask, self.sinks, dropout)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=self.group > 1)
            return self.c_proj(y.transpose(1, 2).reshape(B, L, -1))
        mask, is_causal = None, False
        if start == 0:
            is_causal = L > 1  # keys are exactly the L query positions
        elif L > 1:  # a chunk after a cached prefix: query i (position start+i) sees keys 0..start+i
            q_pos = torch.arange(start, start + L, device=x.device)
            mask = torch.arange(start + L, device=x.device)[None, :] <= q_pos[:, None]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, enable_gqa=self.group > 1,
        )
        return self.c_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    """The dense FFN: Linear -> GELU -> Linear, or SwiGLU (`c_fc` projects to interleaved gate and up units)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.mlp_activation
        self.c_fc = nn.Linear(cfg.d_model, in_width(cfg.ffn_dim, cfg.mlp_activation), bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)

    def init_weights(self, std: float, out_std: float) -> None:
        _init_linear(self.c_fc, std)
        _init_linear(self.c_proj, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(activate(self.c_fc(x), self.activation))


class Block(nn.Module):
    """Pre-norm transformer block; its FFN is an MoE layer when `num_experts` is given."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, num_experts: int | None = None):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn: nn.Module = (
            CausalSelfAttention(cfg, layer_idx) if cfg.mla is None else MultiHeadLatentAttention(cfg.mla, layer_idx)
        )
        self.ln_2 = make_norm(cfg)
        self.is_moe = num_experts is not None
        self.ffn: nn.Module = (
            MoELayer(cfg.d_model, cfg.ffn_dim, num_experts, cfg.moe) if num_experts is not None else MLP(cfg)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | MLACache | None = None,
        *,
        return_router_logits: bool = False,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        """(the residual stream after the block, the MoE layer's stats or None); `return_router_logits` asks
        an MoE layer for its router logits (`MoEStats.router_logits`)."""
        x = x + self.drop(self.attn(self.ln_1(x), cos, sin, cache))
        stats = None
        if self.is_moe:
            h, stats = (self.ffn(self.ln_2(x), return_router_logits=True) if return_router_logits
                        else self.ffn(self.ln_2(x)))
        else:
            h = self.ffn(self.ln_2(x))
        return x + self.drop(h), stats
