"""The layout of the fused projections, and conversions to and from their parts.

Two projections hold several tensors in one: attention's `c_attn` (q, k, v) and SwiGLU's input projection
(gate, up). Both are interleaved in groups along their fused dimension, so that every contiguous slice of
whole groups is a smaller projection of the same kind (what a tensor-parallel rank holds):

- `c_attn` rows: for each key/value head g, its n_heads / n_kv_heads query heads, then k_g, then v_g;
- SwiGLU units: gate_0, up_0, gate_1, up_1, ... (`distill.moe.experts.activate`).

`interleave` builds the fused tensor from its parts (e.g. transformers' q_proj, k_proj, v_proj), and
`deinterleave` is its inverse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from distill.models.config import ModelConfig


def layout_problem(checkpoint: Mapping[str, Any]) -> str | None:
    """Why a training checkpoint written before this layout (no `fused_layout`) cannot be resumed, or None."""
    if checkpoint.get("fused_layout") == FUSED_LAYOUT:
        return None
    return ("it was written by an older distill whose fused q/k/v and SwiGLU weights are laid out differently "
            "(distill/models/fused.py): its training state cannot be resumed (as a teacher, teacher=checkpoint "
            "converts it)")


def qkv_group_sizes(cfg: ModelConfig) -> tuple[int, int, int]:
    """Rows of q, k and v in each key/value-head group of `c_attn`."""
    hd = cfg.head_dim
    return (cfg.n_heads // cfg.kv_heads) * hd, hd, hd


GLU_GROUP_SIZES = (1, 1)  # SwiGLU: one gate unit, then one up unit
# The name of this layout, recorded in exports (config.json) and training checkpoints (`fused_layout`): weights
# without it hold the plain concatenation of the parts ([q | k | v], [gate | up]), written before it.
FUSED_LAYOUT = "grouped"


def interleave(parts: Sequence[torch.Tensor], sizes: Sequence[int], dim: int = 0) -> torch.Tensor:
    """`parts` cut along `dim` into groups of `sizes[i]` and interleaved group by group: group 0 of every
    part, then group 1 of every part, ... Every part must have the same number of groups."""
    dim = dim % parts[0].dim()
    groups = {p.shape[dim] // s for p, s in zip(parts, sizes)}
    if len(groups) != 1 or any(p.shape[dim] % s for p, s in zip(parts, sizes)):
        raise ValueError(f"parts of sizes {[p.shape[dim] for p in parts]} along dim {dim} do not split into the "
                         f"same number of groups of {list(sizes)}")
    n = groups.pop()
    split = [p.unflatten(dim, (n, s)) for p, s in zip(parts, sizes)]
    return torch.cat(split, dim + 1).flatten(dim, dim + 1)


def deinterleave(fused: torch.Tensor, sizes: Sequence[int], dim: int = 0) -> list[torch.Tensor]:
    """The parts `interleave` made `fused` of (contiguous tensors)."""
    dim = dim % fused.dim()
    unit = sum(sizes)
    if fused.shape[dim] % unit:
        raise ValueError(f"dim {dim} of size {fused.shape[dim]} is not a whole number of groups of {unit}")
    grouped = fused.unflatten(dim, (fused.shape[dim] // unit, unit))
    return [p.flatten(dim, dim + 1).contiguous() for p in grouped.split(list(sizes), dim + 1)]


def fused_tensors(cfg: ModelConfig) -> dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Every fused tensor of a GPT of `cfg`: name -> (its fused dim, its parts' sizes along it, their group
    sizes). Weights written before the grouped layout (no `FUSED_LAYOUT` recorded) hold these as the plain
    concatenation of their parts ([q | k | v], [gate | up]); `interleave` of the parts converts them."""
    qkv = qkv_group_sizes(cfg)
    groups = cfg.kv_heads
    out: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {}
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        for suffix in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            out[f"{b}attn.c_attn.{suffix}"] = (0, tuple(s * groups for s in qkv), qkv)
        if not cfg.is_moe_block(i):
            if cfg.mlp_activation == "swiglu":
                for suffix in ("weight", "bias") if cfg.bias else ("weight",):
                    out[f"{b}ffn.c_fc.{suffix}"] = (0, (cfg.ffn_dim, cfg.ffn_dim), GLU_GROUP_SIZES)
            continue
        moe = cfg.moe
        if moe.activation != "swiglu":
            continue
        f = moe.d_ff if moe.d_ff is not None else cfg.ffn_dim
        out[f"{b}ffn.experts.w_in"] = (2, (f, f), GLU_GROUP_SIZES)
        if moe.residual:
            out[f"{b}ffn.mlp.w_in.weight"] = (0, (f, f), GLU_GROUP_SIZES)
        if moe.num_shared_experts:
            shared = moe.shared_d_ff or moe.num_shared_experts * f
            out[f"{b}ffn.shared_mlp.w_in.weight"] = (0, (shared, shared), GLU_GROUP_SIZES)
    return out
