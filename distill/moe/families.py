"""DeepSeek-V2, DeepSeek-V3 and GPT-OSS MoE layers as MoELayer options: their MoEConfig, and the weight map.

The reference is transformers 5.24 (`DeepseekV2Moe`, `DeepseekV3MoE`, `GptOssMLP`); `moe_options_from_hf`
gives the `model.moe` options of a transformers config, and `moe_weight_rules` how each of our layer's
tensors is made of the transformers layer's in-memory tensors, in the rule form of
`distill.interop.hf_weights` ((ours, theirs, how), `how` one of that module's kinds):

- "rows": the tensor as it is (a student keeping only the first experts keeps the first rows);
- "t": dims 1 and 2 swapped (stacked experts);
- "t_glu": dims 1 and 2 swapped, then the [gate | up] halves of the last dim interleaved unit by unit
  (DeepSeek's `gate_up_proj` [E, 2f, d] -> our `w_in` [E, d, 2f] = gate_0, up_0, gate_1, up_1, ...);
- "glu": the rows of gate_proj and up_proj interleaved (a dense SwiGLU MLP: the shared experts).

GPT-OSS's `gate_up_proj` [E, d, 2f] is already interleaved (gate at even, up at odd columns) and
`down_proj` is [E, f, d]: both are ours as they are. (Its hub files store MXFP4 `*_blocks` / `*_scales`;
transformers' dequantisation gives these in-memory tensors.) `hf_moe_state` applies the rules in memory.
"""

from __future__ import annotations

from typing import Any

import torch

from distill.errors import ConfigError
from distill.moe.config import MoEConfig

FAMILIES = ("deepseek_v2", "deepseek_v3", "gpt_oss")


def _family(hf: Any) -> str:
    family = getattr(hf, "model_type", None)
    if family not in FAMILIES:
        raise ConfigError("teacher.path", f"model_type {family!r} is not an MoE family of this module.",
                          f"use one of {list(FAMILIES)}.")
    return family


def moe_options_from_hf(hf: Any) -> dict[str, Any]:
    """The `model.moe` options (MoEConfig fields) that make our MoE layer compute the MoE layer of the
    transformers config `hf` (DeepseekV2Config, DeepseekV3Config or GptOssConfig), dropless as there.

    The expert count is the model's (`n_routed_experts` / `num_local_experts`), d_ff `moe_intermediate_size`
    (GPT-OSS: `intermediate_size`). DeepSeek-V2: transformers 5.24 ignores `norm_topk_prob` (its router
    never renormalises), so neither do we. DeepSeek-V3: `e_score_correction_bias` is our `aux_free_bias`
    buffer (`router.balance_bias`); it moves only if a run trains with `aux_free_bias_rate` > 0."""
    family = _family(hf)
    opts: dict[str, Any] = dict(top_k=hf.num_experts_per_tok, activation="swiglu", dropless=True)
    if family == "gpt_oss":
        return opts | dict(d_ff=hf.intermediate_size, score_func="softmax", renormalize=True,
                           renormalize_top1=True, router_bias=True, expert_bias=True,
                           swiglu_limit=float(hf.swiglu_limit), swiglu_alpha=float(hf.swiglu_alpha))
    if getattr(hf, "hidden_act", "silu") != "silu" or getattr(hf, "mlp_bias", False):
        raise ConfigError("teacher.path", f"{family} with hidden_act={hf.hidden_act!r} / mlp_bias is not supported.")
    opts |= dict(d_ff=hf.moe_intermediate_size, routed_scaling_factor=float(hf.routed_scaling_factor),
                 num_shared_experts=hf.n_shared_experts or 0)
    groups = hf.n_group if hf.n_group and hf.n_group > 1 else None
    if family == "deepseek_v2":
        opts |= dict(score_func="softmax", renormalize=False)
        if hf.topk_method == "group_limited_greedy" and groups:
            opts |= dict(n_group=groups, topk_group=hf.topk_group, group_score="max")
        elif hf.topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError("teacher.path", f"deepseek_v2 topk_method {hf.topk_method!r} is not supported.")
        return opts
    norm = bool(hf.norm_topk_prob)
    opts |= dict(score_func="sigmoid", renormalize=norm, renormalize_top1=norm, aux_free_bias=True)
    if groups:
        opts |= dict(n_group=groups, topk_group=hf.topk_group, group_score="top2_sum")
    return opts


def moe_weight_rules(ours: str, theirs: str, family: str, cfg: MoEConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """(our key, transformers keys, how) for one MoE layer: `ours` its prefix in our model (e.g.
    "blocks.3.ffn."), `theirs` the transformers MoE module's (e.g. "model.layers.3.mlp.")."""
    if family == "gpt_oss":
        r, e = theirs + "router.", theirs + "experts."
        return [
            (ours + "router.weight", (r + "weight",), "rows"),
            (ours + "router.bias", (r + "bias",), "rows"),
            (ours + "experts.w_in", (e + "gate_up_proj",), "rows"),
            (ours + "experts.b_in", (e + "gate_up_proj_bias",), "rows"),
            (ours + "experts.w_out", (e + "down_proj",), "rows"),
            (ours + "experts.b_out", (e + "down_proj_bias",), "rows"),
        ]
    g, e, sh = theirs + "gate.", theirs + "experts.", theirs + "shared_experts."
    rules = [
        (ours + "router.weight", (g + "weight",), "rows"),
        (ours + "experts.w_in", (e + "gate_up_proj",), "t_glu"),
        (ours + "experts.w_out", (e + "down_proj",), "t"),
    ]
    if family == "deepseek_v3":
        rules.append((ours + "router.balance_bias", (g + "e_score_correction_bias",), "rows"))
    if cfg.num_shared_experts:
        rules += [
            (ours + "shared_mlp.w_in.weight", (sh + "gate_proj.weight", sh + "up_proj.weight"), "glu"),
            (ours + "shared_mlp.w_out.weight", (sh + "down_proj.weight",), "rows"),
        ]
    return rules


def glu_interleave(gate: torch.Tensor, up: torch.Tensor, dim: int) -> torch.Tensor:
    """gate and up [.., f, ..] -> [.., 2f, ..] along `dim` (>= 0): gate_0, up_0, gate_1, up_1, ..."""
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


def _apply(how: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if how == "glu":
        return glu_interleave(parts[0], parts[1], 0)
    if how == "t_glu":
        return glu_interleave(*parts[0].transpose(1, 2).chunk(2, dim=2), dim=2)
    return parts[0].transpose(1, 2) if how == "t" else parts[0]


def hf_moe_state(hf_state: dict[str, torch.Tensor], family: str, cfg: MoEConfig,
                 ours: str = "", theirs: str = "") -> dict[str, torch.Tensor]:
    """Our MoELayer's state (keys under `ours`) from the transformers MoE module's `hf_state` (keys under
    `theirs`), by `moe_weight_rules`; all experts kept."""
    return {key: _apply(how, [hf_state[k] for k in keys]).contiguous()
            for key, keys, how in moe_weight_rules(ours, theirs, family, cfg)}
