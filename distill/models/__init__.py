"""The decoder: a GPT with (PR-)MoE FFNs, its config schema, loss and optimizer-group helpers."""

from distill.models.config import ModelConfig
from distill.models.gpt import GPT, ModelOutput
from distill.models.layers import KVCache
from distill.models.loss import lm_loss
from distill.models.optim import configure_optimizer_groups

__all__ = [
    "GPT",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "configure_optimizer_groups",
    "lm_loss",
]
