"""A GPT-style decoder (nanoGPT layout) whose FFN is a (PR-)MoE layer every `moe_every` blocks.

Tied embeddings, rotary positions, pre-norm LayerNorm, causal attention through
`scaled_dot_product_attention`, a KV cache for generation. Config switches give the Llama-family layout
of Mixtral / Qwen2-MoE: RMSNorm, grouped-query attention, SwiGLU, untied head; and those of Qwen3-MoE, OLMoE
and GPT-OSS attention: q/k norms, scaled RoPE (`distill.models.rope`), sliding windows, attention sinks, any
set of dense blocks; DeepSeek's multi-head latent attention (`distill.models.mla`). No training concerns live here: the
forward pass returns logits (or, with `return_logits=False`, the head's input for a fused head and loss) and the MoE
layers' statistics; losses are computed by the caller. The blocks
it is made of live in `distill.models.layers`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.models.config import ModelConfig
from distill.models.layers import Block, KVCache, make_norm, rope_tables
from distill.models.mla import MLACache
from distill.models.mla import rope_tables as mla_rope_tables
from distill.moe import MoELayer, MoEStats


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None  # [B, L, V]; None with `return_logits=False`
    aux_loss: torch.Tensor  # scalar: sum of the MoE layers' load-balancing losses (0 without MoE)
    z_loss: torch.Tensor  # scalar: sum of the MoE layers' router z-losses
    moe_stats: list[MoEStats]  # one per MoE layer, in depth order
    # the residual stream after each block, [B, L, d] each, in depth order; only with `return_hidden`
    hidden_states: list[torch.Tensor] | None = None
    # the final normalised hidden states [B, L, d] (the head's input); only with `return_logits=False`
    final_hidden: torch.Tensor | None = None


class GPT(nn.Module):
    """The decoder of a ModelConfig, used as given (the app layer runs `ModelConfig.validate` once per run)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        experts = iter(cfg.num_experts)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            [Block(cfg, i, next(experts) if cfg.is_moe_block(i) else None) for i in range(cfg.n_layers)]
        )
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    # -- init and bookkeeping ----------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, output projections of residual branches
        (attention, MLPs, experts) N(0, init_std / sqrt(2 * n_layers)).

        The MoE layers initialise their own parameters (`MoELayer.init_weights`) with these two stds.
        Also initialises a model built on the meta device after `to_empty` (which unties the head).
        """
        std = self.cfg.init_std
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        else:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.wte.weight, mean=0.0, std=std)
        for block in self.blocks:
            block.ln_1.reset_parameters()
            block.ln_2.reset_parameters()
            block.attn.init_weights(std, out_std)
            block.ffn.init_weights(std, out_std)
        self.ln_f.reset_parameters()

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in depth order."""
        return [b.ffn for b in self.blocks if b.is_moe]

    def _expert_counts(self) -> list[tuple[int, int, int]]:
        """(experts in the layer, experts held here, parameters per expert) for each MoE layer."""
        counts = []
        for layer in self.moe_layers:
            local = layer.experts.num_local_experts
            per_expert = sum(p.numel() for p in layer.experts.parameters()) // local
            counts.append((layer.num_experts, local, per_expert))
        return counts

    def num_params(self) -> int:
        """All parameters, embeddings included (a tied embedding/head matrix counted once).

        Counts every expert of every layer, also when expert parallelism keeps only a slice here.
        """
        held = sum(p.numel() for p in self.parameters())
        return held + sum((n - local) * per for n, local, per in self._expert_counts())

    def num_active_params(self) -> int:
        """Parameters one token goes through: embeddings included (when tied, counted once), every
        non-expert parameter (attention, norms, dense MLPs, routers, residual MLPs and their mixing
        coefficients, shared experts) and `top_k` routed experts per MoE layer."""
        k = self.cfg.moe.top_k
        return self.num_params() - sum((n - k) * per for n, _, per in self._expert_counts())

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache | MLACache:
        """An empty KV cache on the model's device and dtype (`max_len` defaults to max_seq_len)."""
        w = self.wte.weight
        if self.cfg.mla is not None:
            return MLACache(self.cfg.n_layers, batch_size, max_len or self.cfg.max_seq_len, self.cfg.mla,
                            device=w.device, dtype=w.dtype)
        return KVCache(
            self.cfg.n_layers,
            batch_size,
            self.cfg.kv_heads,
            max_len or self.cfg.max_seq_len,
            self.cfg.head_dim,
            device=w.device,
            dtype=w.dtype,
        )

    # -- forward -------------------------------------------------------------------------------------

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | MLACache | None = None,
        *,
        return_router_logits: bool = False,
        return_hidden: bool = False,
        return_logits: bool = True,
    ) -> ModelOutput:
        """Logits for token ids `idx` [B, L]. With a `cache`, `idx` continues the cached positions and the
        cache is advanced by L.

        For distillation: `return_router_logits` fills each MoE layer's `MoEStats.router_logits` ([B*L, E]
        fp32, before any noise), `return_hidden` fills `ModelOutput.hidden_states`. Both off by default:
        nothing extra is computed or kept. `return_logits=False` skips the head: `logits` is None and
        `final_hidden` holds its input (a fused head and loss applies `lm_head.weight` chunk by chunk)."""
        B, L = idx.shape
        start = cache.pos if cache is not None else 0
        if start + L > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start + L} positions exceeds model.max_seq_len={self.cfg.max_seq_len}."
            )
        x = self.drop(self.wte(idx))
        positions = torch.arange(start, start + L, device=idx.device)
        if self.cfg.mla is not None:
            cos, sin = mla_rope_tables(self.cfg.mla, positions)
        else:
            cos, sin = rope_tables(self.cfg.head_dim, positions, self.cfg.rope_theta, self.cfg.rope_scaling)
        stats: list[MoEStats] = []
        hidden: list[torch.Tensor] | None = [] if return_hidden else None
        for block in self.blocks:
            if return_router_logits:
                x, s = block(x, cos, sin, cache, return_router_logits=True)
            else:
                x, s = block(x, cos, sin, cache)
            if s is not None:
                stats.append(s)
            if hidden is not None:
                hidden.append(x)
        final = self.ln_f(x)
        logits = self.lm_head(final) if return_logits else None
        if cache is not None:
            cache.pos += L
        zero = (final if logits is None else logits).new_zeros((), dtype=torch.float32)
        aux = torch.stack([s.aux_loss for s in stats]).sum() if stats else zero
        z = torch.stack([s.z_loss for s in stats]).sum() if stats else zero
        return ModelOutput(logits=logits, aux_loss=aux, z_loss=z, moe_stats=stats, hidden_states=hidden,
                           final_hidden=None if return_logits else final)

    # -- generation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Continue `idx` [B, L] by `max_new_tokens` tokens, in eval mode; returns [B, L + max_new_tokens].

        With `use_cache` the prompt is prefilled into a KV cache and then one token is fed at a time;
        without it every step runs the full growing sequence (the reference). `greedy` takes the argmax
        (deterministic); otherwise samples from softmax(logits / temperature), optionally restricted to
        the `top_k` most likely tokens. With `return_logits` also returns the raw logits [B, N, V] each
        new token was chosen from.

        MoE capacity applies per forward call, so cached and uncached decoding agree exactly only when
        no token is dropped (`model.moe.dropless`, or enough `eval_capacity_factor`).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (or use greedy).")
        total = idx.size(1) + max_new_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(
                f"prompt + max_new_tokens = {total} exceeds model.max_seq_len={self.cfg.max_seq_len}."
            )
        was_training = self.training
        self.eval()
        try:
            cache = self.new_cache(idx.size(0), total) if use_cache else None
            out, step_input, step_logits = idx, idx, []
            for _ in range(max_new_tokens):
                logits = self(step_input if use_cache else out, cache=cache).logits[:, -1, :]
                step_logits.append(logits)
                nxt = _pick_next(logits, temperature, top_k, greedy, generator)
                out = torch.cat([out, nxt], dim=1)
                step_input = nxt
        finally:
            self.train(was_training)
        if not return_logits:
            return out
        V = self.cfg.vocab_size
        all_logits = (
            torch.stack(step_logits, 1)
            if step_logits
            else idx.new_zeros((idx.size(0), 0, V), dtype=torch.float32)
        )
        return out, all_logits


def _pick_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    greedy: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token [B, 1] from last-position logits [B, V]."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
