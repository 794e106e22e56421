"""Attention options beyond plain causal attention, each off by default (`CausalSelfAttention` uses them):
query/key RMSNorm (Qwen3-MoE per head, OLMoE over the whole projection), sliding-window masks, and
attention sinks (GPT-OSS: a learned per-head logit that joins the softmax denominator and takes no value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def norm_qk(q: torch.Tensor, k: torch.Tensor, q_norm: torch.nn.Module, k_norm: torch.nn.Module,
            per_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, L, G, group, hd] and k [B, L, G, 1, hd] (G key/value groups, heads in their transformers order)
    normalised per head (`per_head`) or each over its whole projection (all heads' values at once)."""
    if per_head:
        return q_norm(q), k_norm(k)
    return q_norm(q.flatten(2)).view(q.shape), k_norm(k.flatten(2)).view(k.shape)


def attention_mask(start: int, length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean mask [length, start + length]: query i (position start + i) sees key j when j <= start + i and,
    with a `window`, start + i - j < window (its own position and the window - 1 before it)."""
    q_pos = torch.arange(start, start + length, device=device)[:, None]
    k_pos = torch.arange(start + length, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                   dropout: float = 0.0) -> torch.Tensor:
    """softmax([q k^T / sqrt(hd) masked, sink]) without the sink's column, times v; q [B, H, L, hd], k and v
    [B, H_kv, S, hd], `mask` [L, S] boolean, `sinks` [H]. The softmax runs in fp32."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    probs = F.dropout(probs, p=dropout) if dropout > 0 else probs
    return probs.to(v.dtype) @ v
