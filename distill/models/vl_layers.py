"""The VL-MoE encoder's building blocks: bidirectional self-attention and the multiway block.

A block is pre-norm: shared self-attention over the whole sequence, then each token's FFN by modality:
V-FFN (or a V-MoE `MoELayer`) for image tokens, T-FFN (or T-MoE) for text tokens, and in the top
`n_vl_layers` blocks the VL-FFN for every token of an image-text input (BEiT-3). Each modality's tokens
are gathered and given to their own layer, so an image token never reaches a text expert.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from distill.models.vl_config import VLMoEConfig
from distill.moe import MLP, MoELayer, MoEStats


class PoolStats(NamedTuple):
    """One MoE pool's statistics for one forward pass."""

    layer: int  # block index
    pool: str  # "v" (V-MoE, image tokens) or "t" (T-MoE, text tokens)
    stats: MoEStats


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention. `c_attn` holds q, k, v fused in the grouped layout of
    `distill.models.fused` with one key/value head per query head: rows q_h, k_h, v_h for each head h."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def init_weights(self, std: float, out_std: float) -> None:
        for linear, s in ((self.c_attn, std), (self.c_proj, out_std)):
            nn.init.normal_(linear.weight, std=s)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, d]; `key_mask` [B, S] bool, True for the positions that may be attended to."""
        B, S, _ = x.shape
        qkv = self.c_attn(x).view(B, S, -1, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))  # [B, H, S, hd] each
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.c_proj(y.transpose(1, 2).reshape(B, S, -1))


def _modality_ffn(
    ffn: nn.Module, h: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, MoEStats | None]:
    """Apply `ffn` to the rows of h [B, n, d] that `valid` [B, n] marks (all when None) and scatter the
    results back (zeros elsewhere); an MoE layer that would get no row is not called (stats None)."""
    rows = h.reshape(-1, h.shape[-1]) if valid is None else h[valid]
    if rows.shape[0] == 0:
        return torch.zeros_like(h), None
    stats = None
    if isinstance(ffn, MoELayer):
        y, stats = ffn(rows)
    else:
        y = ffn(rows)
    out = y.view_as(h) if valid is None else h.new_zeros(h.shape).index_put((valid,), y)
    return out, stats


class VLBlock(nn.Module):
    """Pre-norm multiway block: shared attention; `v_ffn` / `t_ffn` (dense `MLP` or `MoELayer`), and
    `vl_ffn` (dense) in the top `n_vl_layers` blocks."""

    def __init__(self, cfg: VLMoEConfig, layer_idx: int):
        super().__init__()
        d, f, act = cfg.d_model, cfg.ffn_dim, cfg.moe.activation
        self.layer_idx = layer_idx
        self.ln_1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = SelfAttention(d, cfg.n_heads, cfg.dropout)
        self.ln_2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.is_moe = cfg.is_moe_block(layer_idx)
        self.v_ffn: nn.Module = MoELayer(d, f, cfg.num_v_experts, cfg.moe) if self.is_moe else MLP(d, f, act)
        self.t_ffn: nn.Module = MoELayer(d, f, cfg.num_t_experts, cfg.moe) if self.is_moe else MLP(d, f, act)
        self.vl_ffn = MLP(d, f, act) if cfg.is_vl_block(layer_idx) else None
        self.drop = nn.Dropout(cfg.dropout)

    def init_weights(self, std: float, out_std: float) -> None:
        self.ln_1.reset_parameters()
        self.ln_2.reset_parameters()
        self.attn.init_weights(std, out_std)
        for ffn in (self.v_ffn, self.t_ffn, self.vl_ffn):
            if ffn is not None:
                ffn.init_weights(std, out_std)

    def forward(
        self, x: torch.Tensor, n_image: int, text_valid: torch.Tensor | None, key_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[PoolStats]]:
        """x [B, n_image + n_text, d]: image tokens first. `text_valid` [B, n_text] bool marks the text
        tokens that are not padding (None: all); padding never reaches a T-MoE router."""
        x = x + self.drop(self.attn(self.ln_1(x), key_mask))
        h = self.ln_2(x)
        n_text = h.shape[1] - n_image
        if self.vl_ffn is not None and n_image > 0 and n_text > 0:  # an image-text input: the VL expert
            return x + self.drop(self.vl_ffn(h)), []
        out_v, stats_v = _modality_ffn(self.v_ffn, h[:, :n_image], None)
        out_t, stats_t = _modality_ffn(self.t_ffn, h[:, n_image:], text_valid)
        stats = [
            PoolStats(self.layer_idx, pool, s)
            for pool, s in (("v", stats_v), ("t", stats_t))
            if s is not None
        ]
        return x + self.drop(torch.cat([out_v, out_t], dim=1)), stats
