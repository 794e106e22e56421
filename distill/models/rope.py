"""Rotary position embeddings (rotate-half form): frequencies, scaled variants, cos/sin tables, rotation.

`model.rope_scaling` is empty for plain RoPE (``inv_freq = theta ** (-2i / head_dim)``), or a mapping in the
form of a Hugging Face config's ``rope_parameters`` (without ``rope_theta``, which is `model.rope_theta`):

- ``{"rope_type": "linear", "factor": f}``: every frequency divided by f (position interpolation).
- ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``:
  Llama 3.1's: long wavelengths divided by the factor, short ones kept, a smooth ramp between.
- ``{"rope_type": "yarn", "factor", "original_max_position_embeddings", optional "beta_fast" (32), "beta_slow"
  (1), "truncate" (true), "attention_factor", "mscale", "mscale_all_dim"}``: YaRN's per-frequency blend of
  interpolation and extrapolation, and cos/sin scaled by the attention factor
  (default ``0.1 * ln(factor) + 1``, or the ratio of the two mscale terms when both are given).

The formulas are transformers' (`transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`), which the tests
compare against. Any other type or field is a ConfigError naming it: nothing is approximated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from distill.errors import ConfigError

FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # rope_type -> (required, optional) fields
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("beta_fast", "beta_slow", "truncate", "attention_factor", "mscale", "mscale_all_dim")),
}


def check_rope_scaling(scaling: Mapping[str, Any], key: str) -> None:
    """ConfigError naming `key` and the field when `scaling` is not a rope_scaling this module computes."""
    if not scaling:
        return
    kind = scaling.get("rope_type", "default")
    if kind not in FIELDS:
        raise ConfigError(key, f"rope_type {kind!r} is not supported.", f"use one of {list(FIELDS)}.")
    required, optional = FIELDS[kind]
    for name in scaling:
        if name != "rope_type" and name not in required + optional:
            raise ConfigError(key, f"field {name!r} of rope_type {kind!r} is not supported.",
                              f"{kind} takes {list(required + optional)}.")
    for name in required:
        if scaling.get(name) is None:
            raise ConfigError(key, f"rope_type {kind!r} needs the field {name!r}.")
    factor = scaling.get("factor")
    if factor is not None and not (isinstance(factor, (int, float)) and factor > 0):
        raise ConfigError(key, f"field 'factor' must be a positive number, got {factor!r}.")


def _yarn(dim: int, theta: float, s: Mapping[str, Any]) -> tuple[torch.Tensor, float]:
    factor, original = float(s["factor"]), s["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singularity
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
    return inv_freq, float(attention)


def _llama3(base: torch.Tensor, s: Mapping[str, Any]) -> torch.Tensor:
    factor, low_f, high_f = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / base
    scaled = torch.where(wavelen > old / low_f, base / factor, base)
    smooth = (old / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high_f) * ~(wavelen > old / low_f)
    return torch.where(medium, smoothed, scaled)


def rope_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, float]:
    """(fp32 inverse frequencies [head_dim / 2], the factor cos and sin are scaled by) for `scaling`."""
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return base / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3(base, scaling), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)
    return base, 1.0


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float,
                scaling: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin tables [L, head_dim] for integer `positions` [L]."""
    if scaling:
        inv_freq, attention = rope_frequencies(head_dim, theta, scaling)
        inv_freq = inv_freq.to(positions.device)
    else:  # plain RoPE, computed on the positions' device
        inv_freq, attention = 1.0 / theta ** (
            torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
        ), 1.0
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    if attention == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention, angles.sin() * attention


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., L, head_dim] by its positions' angles; the result keeps x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
