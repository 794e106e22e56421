"""Decoder configuration (the `model` config node): the schema, building it from a mapping, its checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional  # noqa: UP035 (typing generics: OmegaConf structured-config schema)

from distill.errors import ConfigError
from distill.models.mla import MLAConfig
from distill.models.rope import check_rope_scaling
from distill.moe.config import ACTIVATIONS, MoEConfig, fields_from_mapping

MISSING = "???"  # a required value not set yet (the string OmegaConf's structured configs treat as missing)
REQUIRED = ("name", "vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")
NORMS = ("layernorm", "rmsnorm")
QK_NORMS = (None, "head", "full")


@dataclass
class ModelConfig:
    """A GPT-style decoder whose FFN is an MoE layer in every `moe_every`-th block.

    Block ``i`` (0-based) is an MoE block when ``moe_every > 0 and (i + 1) % moe_every == 0`` and ``i`` is
    not in ``dense_layers``; ``num_experts`` lists the expert count of each MoE block in order (the PR-MoE
    pyramid). The options after ``tie_embeddings`` (Qwen3-MoE, OLMoE, GPT-OSS layouts) are off by default.
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
    # Further Hugging Face layouts (distill/interop). Off by default: the model is then exactly the one above.
    # Layer indices past the last block are ignored, so a shallower student keeps the teacher's rule.
    dense_layers: List[int] = field(default_factory=list)  # noqa: UP006  dense blocks moe_every would make MoE
    head_size: Optional[int] = None  # noqa: UP045  width of one attention head; None -> d_model // n_heads
    attn_out_bias: Optional[bool] = None  # noqa: UP045  bias of the attention output projection; None -> `bias`
    qk_norm: Optional[str] = None  # noqa: UP045  RMSNorm of q and k before RoPE: "head" (per head) | "full"
    rope_scaling: Dict[str, Any] = field(default_factory=dict)  # noqa: UP006  {"rope_type": ..., ...} (rope.py)
    sliding_window: Optional[int] = None  # noqa: UP045  a query sees the last `sliding_window` keys (its own too)
    sliding_layers: Optional[List[int]] = None  # noqa: UP006, UP045  blocks with the window; None -> all
    attn_sinks: bool = False  # a learned per-head logit in the softmax denominator (GPT-OSS)
    mla: Optional[MLAConfig] = None  # noqa: UP045  multi-head latent attention (DeepSeek) instead of ours

    @property
    def ffn_dim(self) -> int:
        """Hidden size of the dense MLPs."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads (fewer than `n_heads` with grouped-query attention)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def qkv_bias(self) -> bool:
        return self.attn_bias if self.attn_bias is not None else self.bias

    @property
    def out_bias(self) -> bool:
        """Bias of the attention output projection."""
        return self.attn_out_bias if self.attn_out_bias is not None else self.bias

    def is_moe_block(self, i: int) -> bool:
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0 and i not in self.dense_layers

    def attn_window(self, i: int) -> int | None:
        """The sliding window of block `i`'s attention, or None (full causal attention)."""
        if self.sliding_window is None or (self.sliding_layers is not None and i not in self.sliding_layers):
            return None
        return self.sliding_window

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
        if isinstance(kwargs.get("mla"), Mapping):
            kwargs["mla"] = MLAConfig(**fields_from_mapping(MLAConfig, kwargs["mla"], "model.mla"))
        if isinstance(kwargs.get("rope_scaling"), Mapping):
            kwargs["rope_scaling"] = {str(k): kwargs["rope_scaling"][k] for k in kwargs["rope_scaling"]}
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
        if self.mla is None and self.head_size is None and self.d_model % self.n_heads != 0:
            raise ConfigError(
                "model.n_heads",
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}.",
                "pick n_heads that divides d_model.",
            )
        if self.mla is None and self.head_dim % 2 != 0:
            raise ConfigError(
                "model.n_heads",
                f"head size {self.head_dim} is odd; rotary embeddings need an even one.",
            )
        if self.head_size is not None and (not isinstance(self.head_size, int) or self.head_size <= 0):
            raise ConfigError("model.head_size", f"must be a positive integer or null, got {self.head_size!r}.")
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
        self._validate_layouts()
        return self

    def _validate_layouts(self) -> None:
        """The options of further Hugging Face layouts (`dense_layers` ... `attn_sinks`)."""
        for key in ("dense_layers", "sliding_layers"):
            layers = getattr(self, key) or []
            if any(not isinstance(i, int) or i < 0 for i in layers):
                raise ConfigError(f"model.{key}", f"must list block indices >= 0, got {layers!r}.")
        if self.qk_norm not in QK_NORMS:
            raise ConfigError("model.qk_norm", f"unknown value {self.qk_norm!r}.", f"use one of {list(QK_NORMS)}.")
        if self.qk_norm is not None and self.norm != "rmsnorm":
            raise ConfigError("model.qk_norm", "is an RMSNorm; it needs model.norm=rmsnorm.")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError("model.sliding_window", f"must be a positive integer or null, got {self.sliding_window!r}.")
        if self.sliding_layers is not None and self.sliding_window is None:
            raise ConfigError("model.sliding_layers", "is set but model.sliding_window is null.",
                              "set model.sliding_window, or leave sliding_layers null.")
        check_rope_scaling(self.rope_scaling, "model.rope_scaling")
        if self.mla is not None:
            self.mla.validate("model.mla")
            for key in ("d_model", "n_heads"):
                if getattr(self.mla, key) != getattr(self, key):
                    raise ConfigError(f"model.mla.{key}", f"is {getattr(self.mla, key)}, model.{key} is "
                                      f"{getattr(self, key)}.", "give them the same value.")
            for key in ("qk_norm", "sliding_window", "attn_sinks", "rope_scaling", "head_size", "attn_bias"):
                if getattr(self, key) not in (None, False, {}):
                    raise ConfigError(f"model.{key}", "is an option of our attention; model.mla replaces it.",
                                      f"leave model.{key} unset (model.mla has its own options).")

