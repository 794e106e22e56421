"""MoE layer configuration (the `model.moe` config node), its checks, and the statistics a layer returns."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from distill.errors import ConfigError

ACTIVATIONS = ("gelu", "swiglu")
SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")  # DeepSeek-V3's group score, DeepSeek-V2's (group_limited_greedy)
DROP_POLICIES = ("probs", "position", "random")


def fields_from_mapping(cls: type, d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keyword arguments for the config dataclass `cls` from the mapping `d` (any Mapping, an OmegaConf
    node included: its keys are iterated and its values read one by one). Plain parsing, no value checks:
    a list-like value becomes a list, an int given for a `float` field a float. A key that is not a field
    of `cls` raises ConfigError naming ``<prefix>.<key>``, with the closest field as the fix.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key in d:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            fix = (
                f"did you mean `{prefix}.{close[0]}`?"
                if close
                else f"the keys of `{prefix}` are: {', '.join(sorted(fields))}."
            )
            raise ConfigError(f"{prefix}.{key}", f"is not a {prefix} config key.", fix)
        try:
            value = d[key]
        except Exception as err:  # e.g. an OmegaConf node's mandatory value ("???") or broken interpolation
            problem = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{prefix}.{key}", f"cannot be read: {problem}", f"set `{prefix}.{key}`.") from err
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            value = list(value)
        elif fields[key].type in ("float", float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = value
    return kwargs


@dataclass
class MoEConfig:
    top_k: int = 1
    d_ff: int | None = None  # expert hidden size; None -> the model's d_ff
    activation: str = "gelu"  # "gelu" | "swiglu"
    expert_bias: bool = False  # routed experts' projections have biases (GPT-OSS): experts.b_in, b_out
    swiglu_limit: float | None = None  # GPT-OSS's clamped SwiGLU (see experts.activate); None = plain SwiGLU
    swiglu_alpha: float = 1.702  # the clamped SwiGLU's gate * sigmoid(alpha * gate); only with swiglu_limit
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    renormalize: bool = True  # renormalise the chosen k gate values to sum to 1 (k > 1)
    renormalize_top1: bool = False  # renormalise at top_k=1 too (gate = 1, as transformers' norm_topk_prob)
    routed_scaling_factor: float = 1.0  # gate values times this, after renormalising (DeepSeek-V2/V3)
    n_group: int | None = None  # group-limited routing: experts in n_group equal groups (DeepSeek); None = off
    topk_group: int | None = None  # ... only the experts of the topk_group best groups are eligible
    group_score: str = "top2_sum"  # a group's score: "top2_sum" of its choice scores (V3) | "max" (V2)
    router_bias: bool = False  # the router is a biased linear (GPT-OSS)
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_policy: str = "probs"  # "probs" | "position" | "random" (random token selection, train only)
    dropless: bool = False
    jitter_eps: float = 0.0  # multiplicative router-input jitter in training (0 = off)
    gumbel_noise: bool = False  # Gumbel noise on the logits for the choice only, training only
    residual: bool = False  # PR-MoE residual: dense MLP + routed experts, mixed per token
    num_shared_experts: int = 0  # always-on dense experts, summed
    shared_d_ff: int | None = None  # hidden size of the shared experts' MLP; None -> num_shared_experts * d_ff
    shared_gate: bool = False  # scale the shared output per token by sigmoid(x @ w) (Qwen2-MoE)
    aux_free_bias: bool = False  # balancing bias router.balance_bias (= DeepSeek-V3 e_score_correction_bias)
    aux_free_bias_rate: float = 1e-3
    use_grouped_mm: bool = True  # torch.nn.functional.grouped_mm where shapes allow

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MoEConfig:
        """An MoEConfig from a mapping (the `model.moe` node); unknown keys raise ConfigError. No value checks:
        `validate` does those."""
        return cls(**fields_from_mapping(cls, d, "model.moe"))

    @classmethod
    def from_node(cls, node: Any) -> MoEConfig | None:
        """The `model.moe` value of a model config being built: a mapping becomes an MoEConfig (`from_dict`),
        an MoEConfig or None stays; anything else is a ConfigError."""
        if isinstance(node, Mapping):
            return cls.from_dict(node)
        if node is not None and not isinstance(node, MoEConfig):
            raise ConfigError("model.moe", f"must be a mapping of MoE options, got {node!r}.")
        return node

    def validate(self, num_experts: int) -> MoEConfig:
        """Raise ConfigError naming the first bad `model.moe.*` key for a layer of `num_experts`; return self."""
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ConfigError(
                "model.num_experts", f"expert counts must be integers >= 1, got {num_experts!r}."
            )
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= num_experts:
            raise ConfigError(
                "model.moe.top_k",
                f"must be an integer between 1 and the layer's expert count {num_experts}, got {self.top_k!r}.",
            )
        for key, value, choices in (
            ("activation", self.activation, ACTIVATIONS),
            ("score_func", self.score_func, SCORE_FUNCS),
            ("drop_policy", self.drop_policy, DROP_POLICIES),
        ):
            if value not in choices:
                raise ConfigError(
                    f"model.moe.{key}", f"unknown value {value!r}.", f"use one of {list(choices)}."
                )
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff <= 0):
            raise ConfigError("model.moe.d_ff", f"must be a positive integer or null, got {self.d_ff!r}.")
        for key in ("capacity_factor", "eval_capacity_factor"):
            if not getattr(self, key) > 0:
                raise ConfigError(
                    f"model.moe.{key}",
                    f"must be > 0, got {getattr(self, key)!r}.",
                    "use e.g. 1.0-2.0, or set model.moe.dropless=true for no capacity limit.",
                )
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise ConfigError(
                "model.moe.min_capacity", f"must be an integer >= 0, got {self.min_capacity!r}."
            )
        if not 0.0 <= self.jitter_eps < 1.0:
            raise ConfigError("model.moe.jitter_eps", f"must be in [0, 1), got {self.jitter_eps!r}.")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ConfigError(
                "model.moe.num_shared_experts", f"must be an integer >= 0, got {self.num_shared_experts!r}."
            )
        if self.shared_d_ff is not None and (not isinstance(self.shared_d_ff, int) or self.shared_d_ff <= 0):
            raise ConfigError(
                "model.moe.shared_d_ff", f"must be a positive integer or null, got {self.shared_d_ff!r}."
            )
        if (self.shared_d_ff is not None or self.shared_gate) and self.num_shared_experts < 1:
            raise ConfigError(
                "model.moe.num_shared_experts",
                "is 0, but model.moe.shared_d_ff / shared_gate configure shared experts.",
                "set num_shared_experts >= 1, or leave shared_d_ff null and shared_gate false.",
            )
        self._validate_families(num_experts)
        if self.aux_free_bias_rate < 0:
            raise ConfigError(
                "model.moe.aux_free_bias_rate", f"must be >= 0, got {self.aux_free_bias_rate!r}."
            )
        return self

    def _validate_families(self, num_experts: int) -> None:
        """The checks of the DeepSeek / GPT-OSS options (group-limited routing, scaling, clamped SwiGLU)."""
        if not isinstance(self.routed_scaling_factor, (int, float)) or not self.routed_scaling_factor > 0:
            raise ConfigError(
                "model.moe.routed_scaling_factor", f"must be a number > 0, got {self.routed_scaling_factor!r}.",
                "use 1.0 (off), or the teacher's routed_scaling_factor.",
            )
        if self.renormalize_top1 and not self.renormalize:
            raise ConfigError(
                "model.moe.renormalize_top1", "is true, but model.moe.renormalize is false.",
                "set model.moe.renormalize=true too, or renormalize_top1=false.",
            )
        if self.n_group is None:
            if self.topk_group is not None:
                raise ConfigError(
                    "model.moe.topk_group", "is set, but model.moe.n_group is null (no group-limited routing).",
                    "set model.moe.n_group too, or leave topk_group null.",
                )
        else:
            self._validate_groups(num_experts)
        if self.group_score not in GROUP_SCORES:
            raise ConfigError(
                "model.moe.group_score", f"unknown value {self.group_score!r}.", f"use one of {list(GROUP_SCORES)}."
            )
        if self.swiglu_limit is not None:
            if self.activation != "swiglu":
                raise ConfigError(
                    "model.moe.swiglu_limit", f"clamps SwiGLU, but model.moe.activation is {self.activation!r}.",
                    "set model.moe.activation=swiglu, or leave swiglu_limit null.",
                )
            if not isinstance(self.swiglu_limit, (int, float)) or not self.swiglu_limit > 0:
                raise ConfigError(
                    "model.moe.swiglu_limit", f"must be a number > 0 or null, got {self.swiglu_limit!r}.",
                    "use e.g. 7.0 (GPT-OSS).",
                )
        if not isinstance(self.swiglu_alpha, (int, float)) or not self.swiglu_alpha > 0:
            raise ConfigError("model.moe.swiglu_alpha", f"must be a number > 0, got {self.swiglu_alpha!r}.",
                              "use e.g. 1.702 (GPT-OSS).")

    def _validate_groups(self, num_experts: int) -> None:
        n, kg = self.n_group, self.topk_group
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or num_experts % n:
            raise ConfigError(
                "model.moe.n_group",
                f"must be a positive integer dividing the layer's expert count {num_experts}, got {n!r}.",
                "pick a divisor of every MoE layer's expert count (model.num_experts), or null for no groups.",
            )
        if self.group_score == "top2_sum" and num_experts // n < 2:
            raise ConfigError(
                "model.moe.n_group",
                f"leaves {num_experts // n} expert per group, but group_score=top2_sum sums each group's best two.",
                f"use at most {num_experts // 2} groups, or model.moe.group_score=max.",
            )
        if not isinstance(kg, int) or isinstance(kg, bool) or not 1 <= kg <= n:
            raise ConfigError(
                "model.moe.topk_group", f"must be an integer between 1 and model.moe.n_group={n}, got {kg!r}.",
            )
        if kg * (num_experts // n) < self.top_k:
            raise ConfigError(
                "model.moe.topk_group",
                f"leaves {kg * (num_experts // n)} eligible experts ({kg} groups of {num_experts // n}), "
                f"fewer than model.moe.top_k={self.top_k}.",
                "raise topk_group, or lower top_k.",
            )


class MoEStats(NamedTuple):
    """What one MoE layer reports for one forward pass."""

    aux_loss: torch.Tensor  # scalar, differentiable; 1.0 at perfect balance
    z_loss: torch.Tensor  # scalar, differentiable
    tokens_per_expert: torch.Tensor  # [E] long, routed (token, choice) pairs kept per expert
    drop_fraction: torch.Tensor  # scalar, fraction of (token, choice) pairs dropped
    # [T, E] fp32 router logits before any noise, T the flattened input tokens ([B*L] for a [B, L] batch);
    # only when the forward is asked for them (`return_router_logits`), else None: no extra work or memory
    router_logits: torch.Tensor | None = None
