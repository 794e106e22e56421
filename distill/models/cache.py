"""Decoding caches: what every attention layer has computed for the positions already seen."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every attention layer for a batch of sequences being decoded: per layer
    [B, n_heads, max_len, head_dim] keys and [B, n_heads, max_len, v_dim or head_dim] values.

    `pos` is the number of positions already written; `GPT.forward` advances it after each call.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        v_dim: int | None = None,
    ):
        def zeros(width: int) -> list[torch.Tensor]:
            return [torch.zeros(batch_size, n_heads, max_len, width, device=device, dtype=dtype) for _ in range(n_layers)]

        self.k, self.v = zeros(head_dim), zeros(v_dim or head_dim)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v [B, H, L, *] of `layer` at `pos`; return all keys and values so far."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {end}.")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
