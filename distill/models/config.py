"""Decoder configuration (the `model` config node): the schema, building it from a mapping, its checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, List, Optional  # noqa: UP035 (typing generics: OmegaConf structured-config schema)

from distill.errors import ConfigError
from distill.moe.config import ACTIVATIONS, MoEConfig, fields_from_mapping

MISSING = "???"  # a required value not set yet (the string OmegaConf's structured configs treat as missing)
REQUIRED = ("name", "vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")
NORMS = ("layernorm", "rmsnorm")


@dataclass
class ModelConfig:
    """A GPT-style decoder whose FFN is an MoE layer in every `moe_every`-th block.

    Block ``i`` (0-based) is an MoE block when ``moe_every > 0 and (i + 1) % moe_every == 0``;
    ``num_experts`` lists the expert count of each MoE block in order (the PR-MoE pyramid).
    """

    name: str = MISSING
    vocab_size: int = MISSING
    d_model: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    d_ff: Optional[int] = None  # noqa: UP045  dense MLP hidden size; None -> 4 * d_model
    max_seq_len: int = MISSING
    moe_every: int = 2  # 0 -> a dense model (no MoE blocks)
    num_experts: List[int] = field(default_factory=list)  # noqa: UP006  one entry per MoE block
    moe: MoEConfig = field(default_factory=MoEConfig)
    dropout: float = 0.0
    rope_theta: float = 10000.0
    bias: bool = True  # biases in linear layers and LayerNorms
    init_std: float = 0.02
    # Llama-family conventions (Mixtral, Qwen2-MoE); the defaults keep the GPT-2 layout above.
    norm: str = "layernorm"  # "layernorm" | "rmsnorm" (computed in fp32, scaled in the input dtype)
    norm_eps: float = 1e-5
    n_kv_heads: Optional[int] = None  # noqa: UP045  grouped-query attention; None -> n_heads
    attn_bias: Optional[bool] = None  # noqa: UP045  bias of the q/k/v projection; None -> `bias`
    mlp_activation: str = "gelu"  # dense MLPs: "gelu" | "swiglu"
    tie_embeddings: bool = True  # the LM head shares the token-embedding matrix

    @property
    def ffn_dim(self) -> int:
        """Hidden size of the dense MLPs."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads (fewer than `n_heads` with grouped-query attention)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def qkv_bias(self) -> bool:
        return self.attn_bias if self.attn_bias is not None else self.bias

    def is_moe_block(self, i: int) -> bool:
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_block(i) for i in range(self.n_layers))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """A ModelConfig from a mapping (the `model` node: a dict, or any Mapping such as an OmegaConf node);
        the nested `moe` mapping becomes an MoEConfig.

        Unknown keys (also under `moe`) and missing required keys raise ConfigError; values are not
        checked: `validate` does that.
        """
        kwargs = fields_from_mapping(cls, d, "model")
        for key in REQUIRED:
            if key not in kwargs or kwargs[key] == MISSING:
                raise ConfigError(f"model.{key}", "is required but not set.", f"set `model.{key}`.")
        if "moe" in kwargs:
            kwargs["moe"] = MoEConfig.from_node(kwargs["moe"])
        return cls(**kwargs)

    def validate(self) -> ModelConfig:
        """Raise ConfigError naming the first bad key (`model.*`, and `model.moe.*` through
        `MoEConfig.validate`); return self. The app layer calls it once per run, before building a model."""
        for key in REQUIRED:
            if getattr(self, key) == MISSING:
                raise ConfigError(f"model.{key}", "is required but not set.", f"set `model.{key}`.")
        for key in REQUIRED[1:]:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{key}", f"must be a positive integer, got {value!r}.")
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                "model.n_heads",
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}.",
                "pick n_heads that divides d_model.",
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(
                "model.n_heads",
                f"head size d_model/n_heads={self.head_dim} is odd; rotary embeddings need an even one.",
            )
        if self.d_ff is not None and self.d_ff <= 0:
            raise ConfigError("model.d_ff", f"must be positive or null (4 * d_model), got {self.d_ff}.")
        if self.moe_every < 0:
            raise ConfigError("model.moe_every", f"must be >= 0 (0 = no MoE blocks), got {self.moe_every}.")
        n_moe = self.num_moe_layers
        if len(self.num_experts) != n_moe:
            raise ConfigError(
                "model.num_experts",
                f"has {len(self.num_experts)} entries but n_layers={self.n_layers}, "
                f"moe_every={self.moe_every} give {n_moe} MoE blocks.",
                f"give one expert count per MoE block ({n_moe} entries).",
            )
        if n_moe:
            self.moe.validate(min(self.num_experts))  # model.moe.* and expert counts >= 1
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {self.dropout}.")
        if self.rope_theta <= 0:
            raise ConfigError("model.rope_theta", f"must be positive, got {self.rope_theta}.")
        if self.init_std <= 0:
            raise ConfigError("model.init_std", f"must be positive, got {self.init_std}.")
        if self.norm not in NORMS:
            raise ConfigError("model.norm", f"unknown norm {self.norm!r}.", f"use one of {list(NORMS)}.")
        if not self.norm_eps > 0:
            raise ConfigError("model.norm_eps", f"must be positive, got {self.norm_eps}.")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads != 0):
            raise ConfigError(
                "model.n_kv_heads",
                f"must be a positive divisor of n_heads={self.n_heads}, got {self.n_kv_heads}.",
                "set it to a divisor of n_heads, or null for one key/value head per query head.",
            )
        if self.mlp_activation not in ACTIVATIONS:
            raise ConfigError(
                "model.mlp_activation", f"unknown value {self.mlp_activation!r}.", f"use one of {list(ACTIVATIONS)}."
            )
        return self

