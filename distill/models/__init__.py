"""The decoder: a GPT with (PR-)MoE FFNs, its config schema and optimizer-group helper (its loss: distill.losses)."""

from distill.models.config import ModelConfig
from distill.models.gpt import GPT, ModelOutput
from distill.models.layers import KVCache
from distill.models.optim import configure_optimizer_groups

__all__ = [
    "GPT",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "configure_optimizer_groups",
]
