"""VL-MoE configuration (conf/model/vl_*.yaml, the `model` node of `task=vl`): the schema, parsing, its checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional  # noqa: UP035 (typing generics: OmegaConf structured-config schema)

from distill.errors import ConfigError
from distill.moe.config import MoEConfig, fields_from_mapping

MISSING = "???"
REQUIRED = (
    "name", "d_model", "n_layers", "n_heads", "n_vl_layers", "num_v_experts", "num_t_experts", "image_size",
    "patch_size", "text_vocab_size", "max_text_len", "visual_vocab_size",
)  # fmt: skip
POSITIVE = ("d_model", "n_layers", "n_heads", "image_size", "patch_size", "channels", "text_vocab_size",
            "max_text_len")  # fmt: skip


@dataclass
class VLMoEConfig:
    """A BEiT-3-style multiway encoder whose V/T FFNs are MoE layers in every `moe_every`-th block.

    Block ``i`` (0-based) is a VL block (it also holds the VL-FFN) when ``i >= n_layers - n_vl_layers``,
    and an MoE block (V-MoE and T-MoE replace V-FFN and T-FFN) when ``moe_every > 0 and
    (i + 1) % moe_every == 0`` and, for a VL block, ``moe_in_vl_layers``. Dense FFNs and experts compute
    the same function (`moe.activation`, no biases); the expert width is `moe.d_ff` or `d_ff`.
    """

    name: str = MISSING
    d_model: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    d_ff: Optional[int] = None  # noqa: UP045  FFN hidden size; None -> 4 * d_model
    n_vl_layers: int = MISSING  # F: the top blocks that hold a VL-FFN
    moe_every: int = 2  # 0 -> no MoE blocks
    moe_in_vl_layers: bool = True  # the V/T FFNs of the top F blocks are sparse too (every moe_every-th)
    num_v_experts: int = MISSING  # experts of each V-MoE layer
    num_t_experts: int = MISSING  # experts of each T-MoE layer
    moe: MoEConfig = field(default_factory=MoEConfig)
    image_size: int = MISSING
    patch_size: int = MISSING
    channels: int = 3
    text_vocab_size: int = MISSING
    max_text_len: int = MISSING
    visual_vocab_size: int = MISSING  # the visual tokenizer's codebook size (masked image modeling targets)
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def is_vl_block(self, i: int) -> bool:
        return i >= self.n_layers - self.n_vl_layers

    def is_moe_block(self, i: int) -> bool:
        return (self.moe_every > 0 and (i + 1) % self.moe_every == 0
                and (self.moe_in_vl_layers or not self.is_vl_block(i)))  # fmt: skip

    @property
    def num_moe_blocks(self) -> int:
        return sum(self.is_moe_block(i) for i in range(self.n_layers))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VLMoEConfig:
        """A VLMoEConfig from a mapping (a dict or an OmegaConf node); `moe` becomes an MoEConfig.
        Unknown keys raise ConfigError; values are checked by `validate`."""
        kwargs = fields_from_mapping(cls, d, "model")
        if "moe" in kwargs:
            kwargs["moe"] = MoEConfig.from_node(kwargs["moe"])
        return cls(**kwargs)

    def validate(self) -> VLMoEConfig:
        """Raise ConfigError naming the first bad key (`model.*`, `model.moe.*`); return self."""
        for key in REQUIRED:
            if getattr(self, key) == MISSING:
                raise ConfigError(f"model.{key}", "is required but not set.", f"set `model.{key}`.")
        for key in POSITIVE:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{key}", f"must be a positive integer, got {value!r}.")
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                "model.n_heads",
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}.",
                "pick n_heads that divides d_model.",
            )
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff <= 0):
            raise ConfigError(
                "model.d_ff", f"must be a positive integer or null (4 * d_model), got {self.d_ff!r}."
            )
        if not isinstance(self.n_vl_layers, int) or not 0 <= self.n_vl_layers <= self.n_layers:
            raise ConfigError(
                "model.n_vl_layers",
                f"must be between 0 and n_layers={self.n_layers}, got {self.n_vl_layers!r}.",
                "lower model.n_vl_layers or raise model.n_layers.",
            )
        if not isinstance(self.moe_every, int) or self.moe_every < 0:
            raise ConfigError("model.moe_every", f"must be >= 0 (0 = no MoE blocks), got {self.moe_every!r}.")
        for key in ("num_v_experts", "num_t_experts"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{key}", f"must be an integer >= 1, got {value!r}.")
        if self.num_moe_blocks:
            self.moe.validate(min(self.num_v_experts, self.num_t_experts))
        if self.image_size % self.patch_size != 0:
            raise ConfigError(
                "model.image_size",
                f"{self.image_size} is not divisible by patch_size={self.patch_size}.",
                "use a multiple of model.patch_size.",
            )
        if not isinstance(self.visual_vocab_size, int) or self.visual_vocab_size < 1:
            raise ConfigError(
                "model.visual_vocab_size",
                f"must be an integer >= 1 (the visual codebook size), got {self.visual_vocab_size!r}.",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {self.dropout}.")
        if not self.norm_eps > 0:
            raise ConfigError("model.norm_eps", f"must be positive, got {self.norm_eps}.")
        if not self.init_std > 0:
            raise ConfigError("model.init_std", f"must be positive, got {self.init_std}.")
        return self
