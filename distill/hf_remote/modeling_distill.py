"""A distill model (a GPT-style decoder with (PR-)MoE blocks) as a transformers causal LM.

Self-contained (torch and transformers only): this file is copied verbatim into every exported directory, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works where `distill` is not installed.
It computes what `distill.models.GPT` computes in eval mode, with the same parameter names and fused layouts
(q/k/v grouped by key/value head, SwiGLU gate/up interleaved): rotary positions, pre-norm LayerNorm or RMSNorm,
causal grouped-query attention (`head_size`, `attn_out_bias`), GELU or SwiGLU MLPs, MoE blocks every
`moe_every` blocks (`dense_layers` excepted) with their own expert counts (the pyramid), top-k softmax or
sigmoid routing, expert capacity and token drops per forward call (`eval_capacity_factor`, `dropless`), the
residual MLP mixed per token (PR-MoE), shared experts with an optional sigmoid gate, a balancing bias.
Training-only noise (router jitter, Gumbel noise, random token drops) is not reproduced: train with distill.

Beyond `GPT`: a KV cache through transformers' `DynamicCache` (what `generate` uses) and a 2-D
`attention_mask` for padded batches (padding keys are masked, positions count real tokens only). Padding
tokens still pass through the MoE layers, so with a capacity limit they take part in its drops, as in GPT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_distill import DistillMoEConfig

CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
TF5 = int(transformers.__version__.split(".")[0]) >= 5  # a dict of tied keys since 5, a list before


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin [..., L, head_dim] for integer positions [..., L] (rotate-half form)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """GELU, or SwiGLU over interleaved (gate_0, up_0, gate_1, up_1, ...) units."""
    if activation == "swiglu":
        gate, up = h.unflatten(-1, (-1, 2)).unbind(-1)
        return F.silu(gate) * up
    return F.gelu(h)


def in_width(d_ff: int, activation: str) -> int:
    return 2 * d_ff if activation == "swiglu" else d_ff


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def head_dim(c: dict) -> int:
    return c.get("head_size") or c["d_model"] // c["n_heads"]


def is_moe_block(c: dict, i: int) -> bool:
    return c["moe_every"] > 0 and (i + 1) % c["moe_every"] == 0 and i not in (c.get("dense_layers") or [])


def make_norm(c: dict) -> nn.Module:
    if c["norm"] == "rmsnorm":
        return RMSNorm(c["d_model"], c["norm_eps"])
    return nn.LayerNorm(c["d_model"], eps=c["norm_eps"], bias=c["bias"])


class CausalSelfAttention(nn.Module):
    def __init__(self, c: dict, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim(c)
        kv_heads = c["n_kv_heads"] or c["n_heads"]
        self.group = c["n_heads"] // kv_heads
        qkv_bias = c["bias"] if c["attn_bias"] is None else c["attn_bias"]
        self.c_attn = nn.Linear(c["d_model"], (c["n_heads"] + 2 * kv_heads) * self.head_dim, bias=qkv_bias)
        out_bias = c["bias"] if c.get("attn_out_bias") is None else c["attn_out_bias"]
        self.c_proj = nn.Linear(c["n_heads"] * self.head_dim, c["d_model"], bias=out_bias)
        self.dropout = c["dropout"]

    def forward(self, x, cos, sin, cache, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = x.shape
        qkv = self.c_attn(x).view(B, L, -1, self.group + 2, self.head_dim)
        q, k, v = (t.reshape(B, L, -1, self.head_dim).transpose(1, 2) for t in qkv.split([self.group, 1, 1], dim=3))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        is_causal = mask is None and start == 0 and L > 1
        if mask is None and start > 0 and L > 1:  # a chunk after a cached prefix
            q_pos = torch.arange(start, start + L, device=x.device)
            mask = torch.arange(start + L, device=x.device)[None, :] <= q_pos[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.group > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):  # the dense blocks' FFN
    def __init__(self, c: dict):
        super().__init__()
        self.activation = c["mlp_activation"]
        ffn = c["d_ff"] or 4 * c["d_model"]
        self.c_fc = nn.Linear(c["d_model"], in_width(ffn, self.activation), bias=c["bias"])
        self.c_proj = nn.Linear(ffn, c["d_model"], bias=c["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(activate(self.c_fc(x), self.activation))


class ExpertMLP(nn.Module):  # one expert's function, no biases: the residual MLP, the shared experts
    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d_model, in_width(d_ff, activation), bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))


class MoELayer(nn.Module):
    def __init__(self, c: dict, num_experts: int):
        super().__init__()
        m = self.m = c["moe"]
        d, f = c["d_model"], m["d_ff"] or c["d_ff"] or 4 * c["d_model"]
        self.num_experts, self.top_k, self.activation = num_experts, m["top_k"], m["activation"]
        self.router, self.experts = nn.Module(), nn.Module()  # parameters named as GPT names them
        self.router.weight = nn.Parameter(torch.empty(num_experts, d))
        self.router.register_buffer("balance_bias", torch.zeros(num_experts) if m["aux_free_bias"] else None)
        self.experts.w_in = nn.Parameter(torch.empty(num_experts, d, in_width(f, m["activation"])))
        self.experts.w_out = nn.Parameter(torch.empty(num_experts, f, d))
        self.mlp = ExpertMLP(d, f, m["activation"]) if m["residual"] else None
        self.coef = nn.Linear(d, 2) if m["residual"] else None
        n_shared = m["num_shared_experts"]
        self.shared_mlp = ExpertMLP(d, m["shared_d_ff"] or n_shared * f, m["activation"]) if n_shared else None
        self.shared_gate = nn.Linear(d, 1, bias=False) if m["shared_gate"] else None

    def capacity(self, num_tokens: int) -> int | None:
        if self.m["dropless"]:
            return None
        cf = self.m["capacity_factor"] if self.training else self.m["eval_capacity_factor"]
        cap = max(self.m["min_capacity"], math.ceil(self.top_k * cf * num_tokens / self.num_experts))
        return cap if cap < num_tokens else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> (chosen experts [T, k], fp32 gate values [T, k])."""
        logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1) if self.m["score_func"] == "softmax" else logits.sigmoid()
        choice = probs if self.router.balance_bias is None else probs + self.router.balance_bias
        idx = choice.argmax(-1, keepdim=True) if self.top_k == 1 else choice.topk(self.top_k, dim=-1).indices
        gates = probs.gather(-1, idx)
        if self.m["renormalize"] and self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return idx, gates

    def kept(self, flat: torch.Tensor, gates: torch.Tensor, capacity: int) -> torch.Tensor:
        """Which (token, choice) pairs their experts keep: per expert, the first `capacity` by descending gate
        (ties and `drop_policy=position`: token order)."""
        if self.m["drop_policy"] == "position":
            order = flat.argsort(stable=True)
        else:
            by_priority = gates.flatten().argsort(descending=True, stable=True)
            order = by_priority[flat[by_priority].argsort(stable=True)]
        counts = torch.bincount(flat, minlength=self.num_experts)
        rank = torch.arange(flat.numel(), device=flat.device)
        rank -= (counts.cumsum(0) - counts).repeat_interleave(counts, output_size=flat.numel())
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order[rank < capacity]] = True
        return keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        idx, gates = self.route(x)
        flat = idx.flatten()
        capacity = self.capacity(x.shape[0])
        keep = self.kept(flat, gates, capacity) if capacity is not None else None
        pairs = x.new_zeros(flat.numel(), x.shape[1])
        for e, (w_in, w_out) in enumerate(zip(self.experts.w_in.unbind(0), self.experts.w_out.unbind(0))):
            sel = flat == e if keep is None else (flat == e) & keep
            rows = sel.nonzero().squeeze(1)
            if rows.numel():
                pairs[rows] = activate(x[rows // self.top_k] @ w_in, self.activation) @ w_out
        g = gates.to(pairs.dtype)
        if self.top_k == 1:
            y = pairs * g
        else:
            y = torch.bmm(g.unsqueeze(1), pairs.view(-1, self.top_k, pairs.shape[1])).squeeze(1)
        if self.mlp is not None:
            c = F.softmax(self.coef(x), dim=-1)
            y = y * c[:, :1] + self.mlp(x) * c[:, 1:]
        if self.shared_mlp is not None:
            shared = self.shared_mlp(x)
            y = y + (shared * torch.sigmoid(self.shared_gate(x)) if self.shared_gate is not None else shared)
        return y.reshape(shape)


class Block(nn.Module):
    def __init__(self, c: dict, layer_idx: int, num_experts: int | None):
        super().__init__()
        self.ln_1, self.ln_2 = make_norm(c), make_norm(c)
        self.attn = CausalSelfAttention(c, layer_idx)
        self.ffn = MoELayer(c, num_experts) if num_experts is not None else MLP(c)
        self.drop = nn.Dropout(c["dropout"])

    def forward(self, x, cos, sin, cache, start, mask):
        x = x + self.drop(self.attn(self.ln_1(x), cos, sin, cache, start, mask))
        return x + self.drop(self.ffn(self.ln_2(x)))


class DistillMoEPreTrainedModel(PreTrainedModel):
    config_class = DistillMoEConfig
    base_model_prefix = "distill"
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                nn.init.zeros_(p)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=self.config.distill.get("init_std", 0.02))


class DistillMoEForCausalLM(DistillMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "wte.weight"} if TF5 else ["lm_head.weight"]

    def __init__(self, config: DistillMoEConfig):
        super().__init__(config)
        c = config.distill
        experts = iter(c["num_experts"])
        self.wte = nn.Embedding(c["vocab_size"], c["d_model"])
        self.drop = nn.Dropout(c["dropout"])
        self.blocks = nn.ModuleList([
            Block(c, i, next(experts) if is_moe_block(c, i) else None)
            for i in range(c["n_layers"])])
        self.ln_f = make_norm(c)
        self.lm_head = nn.Linear(c["d_model"], c["vocab_size"], bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, return_dict=None, **kwargs):
        c = self.config.distill
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else getattr(self.config, "use_cache", True)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        x = inputs_embeds if inputs_embeds is not None else self.wte(input_ids)
        L = x.shape[1]
        start = cache.get_seq_length() if cache is not None else 0
        if start + L > c["max_seq_len"]:
            raise ValueError(f"sequence of {start + L} positions exceeds max_seq_len={c['max_seq_len']}.")
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            keys = attention_mask[:, : start + L].bool()
            q_pos = torch.arange(start, start + L, device=x.device)[:, None]
            k_pos = torch.arange(start + L, device=x.device)[None, :]
            mask = ((k_pos <= q_pos)[None] & (keys[:, None, :] | (k_pos == q_pos)[None]))[:, None]
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start : start + L]
        positions = position_ids if position_ids is not None else torch.arange(start, start + L, device=x.device)
        # per-sequence positions give [B, L, hd] tables: broadcast over the heads
        cos, sin = (t[:, None] if t.dim() == 3 else t for t in rope_tables(head_dim(c), positions, c["rope_theta"]))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cos, sin, cache, start, mask)
        x = self.ln_f(x)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
