"""Multi-head latent attention (MLA, DeepSeek-V2 / V3), a drop-in for `layers.CausalSelfAttention`.

Queries: `q_proj` (q_lora_rank null), or the low-rank `q_b_proj(q_a_layernorm(q_a_proj(x)))`; each head's
query is [nope | rope] (qk_nope_head_dim + qk_rope_head_dim). Keys and values come from one compressed
latent: `kv_a_proj_with_mqa(x)` = [latent (kv_lora_rank) | k_rot (qk_rope_head_dim)]; the normalised latent
is expanded per head by `kv_b_proj` into [k_nope | v], while k_rot is one rotary key shared by all heads
(the "decoupled" rotary key). Rotary embedding touches only q's rope part and k_rot. The cache
(`MLACache`) holds the normalised latent and the rotated k_rot, as transformers 5.24 does.

The reference is transformers 5.24's DeepseekV3Attention / DeepseekV2Attention. Our submodules carry
their names (`q_proj`, `q_a_proj`, `q_a_layernorm`, `q_b_proj`, `kv_a_proj_with_mqa`, `kv_a_layernorm`,
`kv_b_proj`, `o_proj`), so their state_dict loads as it is (`load_hf_state_dict`): the name map of a layer
is `<ours>.attn.<name>` <-> `model.layers.<i>.self_attn.<name>`, shapes unchanged.

Rotary layout (`rope_interleave`): DeepSeek-V2 always rotates interleaved pairs (x0, x1), (x2, x3), ...
(complex multiplication); V3 does so when its `rope_interleave` is true (the default), else rotate-half
pairs (x_i, x_{i+d/2}). Which is a property of the trained weights, so it must follow the checkpoint.
Softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (`softmax_scale`);
`rope_tables` gives the cos/sin tables, YaRN's frequencies and attention factor included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import ConfigError
from distill.models.cache import KVCache

ROPE_TYPES = ("default", "yarn")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass
class MLAConfig:
    d_model: int
    n_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: a plain q_proj
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # rotate pairs (2i, 2i+1) (V2; V3's default), else (i, i + d/2)
    rope_type: str = "default"  # "default" | "yarn"
    rope_factor: float = 1.0  # YaRN: the context extension factor
    original_max_position_embeddings: int | None = None  # YaRN: the pre-training context
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None  # YaRN attention factor mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    mscale_all_dim: float | None = None  # ... and the softmax scale times mscale(factor, mscale_all_dim)^2
    attention_factor: float | None = None  # YaRN: the cos/sin factor when given, else from the mscales
    rope_truncate: bool = True
    norm_eps: float = 1e-6  # q_a_layernorm / kv_a_layernorm (transformers uses 1e-6 whatever rms_norm_eps is)
    attention_bias: bool = False  # biases of q_a_proj, kv_a_proj_with_mqa and o_proj
    dropout: float = 0.0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.rope_type != "default" and self.mscale_all_dim:
            scale *= yarn_mscale(self.rope_factor, self.mscale_all_dim) ** 2
        return scale

    def validate(self, prefix: str = "model.mla") -> MLAConfig:
        """Raise ConfigError naming the first bad `<prefix>.*` key; return self."""
        for key in ("d_model", "n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{prefix}.{key}", f"must be a positive integer, got {value!r}.")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{prefix}.qk_rope_head_dim", f"must be even (rotary pairs), got {self.qk_rope_head_dim}.")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            raise ConfigError(f"{prefix}.q_lora_rank", f"must be a positive integer or null, got {self.q_lora_rank!r}.")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"{prefix}.rope_type", f"unknown value {self.rope_type!r}.", f"use one of {list(ROPE_TYPES)}.")
        if self.rope_type == "yarn":
            if not self.original_max_position_embeddings or self.original_max_position_embeddings < 1:
                raise ConfigError(f"{prefix}.original_max_position_embeddings", "must be a positive integer for YaRN.",
                                  "set the checkpoint's rope_parameters.original_max_position_embeddings.")
            if not self.rope_factor > 0:
                raise ConfigError(f"{prefix}.rope_factor", f"must be > 0, got {self.rope_factor!r}.")
        if not self.rope_theta > 0:
            raise ConfigError(f"{prefix}.rope_theta", f"must be > 0, got {self.rope_theta!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout", f"must be in [0, 1), got {self.dropout!r}.")
        return self

    @classmethod
    def from_hf(cls, hf: Any) -> MLAConfig:
        """The MLAConfig of a transformers DeepseekV2Config / DeepseekV3Config."""
        rp = dict(getattr(hf, "rope_parameters", None) or {})
        rope_type = rp.get("rope_type", "default")
        kw: dict[str, Any] = dict(
            d_model=hf.hidden_size, n_heads=hf.num_attention_heads, kv_lora_rank=hf.kv_lora_rank,
            qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim, v_head_dim=hf.v_head_dim,
            q_lora_rank=hf.q_lora_rank, rope_theta=float(rp.get("rope_theta", 10000.0)),
            rope_interleave=hf.model_type == "deepseek_v2" or bool(getattr(hf, "rope_interleave", True)),
            attention_bias=bool(hf.attention_bias), dropout=float(hf.attention_dropout or 0.0),
        )
        if rope_type == "yarn":
            orig = rp.get("original_max_position_embeddings")
            kw |= dict(rope_type="yarn", rope_factor=float(rp.get("factor") or hf.max_position_embeddings / orig),
                       original_max_position_embeddings=orig, beta_fast=float(rp.get("beta_fast") or 32),
                       beta_slow=float(rp.get("beta_slow") or 1), mscale=rp.get("mscale"),
                       mscale_all_dim=rp.get("mscale_all_dim"), attention_factor=rp.get("attention_factor"),
                       rope_truncate=bool(rp.get("truncate", True)))
        elif rope_type != "default":
            raise ConfigError("teacher.path", f"MLA with rope_type {rope_type!r} is not supported.",
                              f"use one of {list(ROPE_TYPES)}.")
        return cls(**kw).validate()


def inv_freq_and_factor(cfg: MLAConfig) -> tuple[torch.Tensor, float]:
    """The rotary inverse frequencies [rope_dim / 2] and the cos/sin factor (transformers' default and
    `_compute_yarn_parameters`)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if cfg.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    factor = cfg.rope_factor
    factor_attn = cfg.attention_factor
    if factor_attn is None:
        factor_attn = (yarn_mscale(factor, cfg.mscale) / yarn_mscale(factor, cfg.mscale_all_dim)
                       if cfg.mscale and cfg.mscale_all_dim else yarn_mscale(factor))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(factor_attn)


def rope_tables(cfg: MLAConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin [L, qk_rope_head_dim] for integer `positions` [L] (each frequency twice, as
    `layers.rope_tables`), times the YaRN attention factor."""
    inv_freq, factor = inv_freq_and_factor(cfg)
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * factor, angles.sin() * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [..., L, d] by the tables [L, d]; interleaved pairs come out as [evens' | odds'] (q and k
    alike, so dot products are those of the interleaved rotation); the result keeps x's dtype."""
    if interleave:
        half = cos.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class MLACache(KVCache):
    """The compressed keys of every MLA layer of a batch being decoded: the normalised latent
    [B, 1, max_len, kv_lora_rank] (`latent`, the KVCache's keys) and the rotated shared key
    [B, 1, max_len, qk_rope_head_dim] (`k_rot`, its values); `update(layer, latent, k_rot)`."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, cfg: MLAConfig,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(n_layers, batch_size, 1, max_len, cfg.kv_lora_rank, device, dtype, v_dim=cfg.qk_rope_head_dim)

    @property
    def latent(self) -> list[torch.Tensor]:
        return self.k

    @property
    def k_rot(self) -> list[torch.Tensor]:
        return self.v


class RMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back, then scaled (transformers' DeepseekV3RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA: `forward(x [B, L, d], cos, sin, cache)` as `layers.CausalSelfAttention` (cos and sin
    [L, qk_rope_head_dim] from `rope_tables`; an `MLACache` instead of a KVCache)."""

    def __init__(self, cfg: MLAConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        h, d, bias = cfg.n_heads, cfg.d_model, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=bias)

    def init_weights(self, std: float, out_std: float) -> None:
        """N(0, std) for the projections, N(0, out_std) for o_proj, zero biases, unit norms."""
        for name, module in self.named_children():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=out_std if name == "o_proj" else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            else:
                nn.init.ones_(module.weight)

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Load a transformers DeepseekV2Attention / DeepseekV3Attention state (keys under `prefix`, e.g.
        "model.layers.3.self_attn."): the names are ours."""
        self.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: MLACache | None = None
    ) -> torch.Tensor:
        cfg = self.cfg
        B, L, _ = x.shape
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(B, L, cfg.n_heads, cfg.qk_head_dim).transpose(1, 2).split(
            [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_layernorm(latent).unsqueeze(1), k_rot.unsqueeze(1)  # [B, 1, L, *]
        q_rot = apply_rope(q_rot, cos, sin, cfg.rope_interleave)
        k_rot = apply_rope(k_rot, cos, sin, cfg.rope_interleave)
        start = 0
        if cache is not None:
            start = cache.pos
            latent, k_rot = cache.update(self.layer_idx, latent, k_rot)
            latent, k_rot = latent.to(q.dtype), k_rot.to(q.dtype)  # a no-op unless autocast runs over an fp32 cache
        S = latent.size(2)
        kv = self.kv_b_proj(latent).view(B, S, cfg.n_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(-1, cfg.n_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        mask, is_causal = None, False
        if start == 0:
            is_causal = L > 1  # keys are exactly the L query positions
        elif L > 1:  # a chunk after a cached prefix: query i (position start+i) sees keys 0..start+i
            q_pos = torch.arange(start, start + L, device=x.device)
            mask = torch.arange(start + L, device=x.device)[None, :] <= q_pos[:, None]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=cfg.dropout if self.training else 0.0, is_causal=is_causal,
            scale=cfg.softmax_scale,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))
