"""Activation checkpointing per block (`parallel.activation_checkpointing`), applied by `parallelize`.

- ``full``: a block keeps only its input; its whole forward, the expert all-to-alls included, runs again
  in the backward.
- ``moe_only``: communication-aware (DeepSpeed-TED): in a block with an MoE layer only the attention is
  recomputed; the MoE layer keeps its activations, so the backward exchanges no tokens twice. Blocks
  without an MoE layer are recomputed whole.

The ``forward`` of the block (or of its attention) is wrapped on the instance, not in a wrapper module:
parameter names, state dicts and checkpoints are the same with it on or off. Random draws (dropout, router
noise) are replayed in the recomputation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _recompute_in_backward(module: nn.Module) -> None:
    inner = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation, a teacher: nothing is saved for a backward anyway
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def checkpoint_block(block: nn.Module, mode: str) -> None:
    """Activation checkpointing of ``mode`` for one block (`distill.models.layers.Block`)."""
    if mode == "none":
        return
    if mode == "moe_only" and getattr(block, "is_moe", False):
        _recompute_in_backward(block.attn)
    else:
        _recompute_in_backward(block)
