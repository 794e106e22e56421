"""Expert MLPs: a dense FFN and the routed experts stored as stacked parameters ([E, d, f], [E, f, d]).

The routed experts compute over rows already grouped by expert (`counts[e]` consecutive rows each):
with `torch.nn.functional.grouped_mm` where dtype and shapes allow, else with split + a loop over
`weight.unbind(0)` (never `w[e]` in a loop: each index's backward allocates a full-size zero gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def activate(h: torch.Tensor, activation: str, swiglu_limit: float | None = None,
             swiglu_alpha: float = 1.702) -> torch.Tensor:
    """GELU on h [.., f], or SwiGLU on h [.., 2f] -> silu(gate) * up.

    SwiGLU's gate and up units are interleaved (gate_0, up_0, gate_1, up_1, ...), so that any contiguous
    slice of whole pairs is a smaller SwiGLU of its own: a tensor-parallel rank's slice of the input
    projection computes its slice of the hidden units (`distill.parallel.tensor`).

    With a `swiglu_limit`, GPT-OSS's clamped SwiGLU (transformers' GptOssExperts._apply_gate): gate clamped
    to at most the limit, up to [-limit, limit], then (up + 1) * gate * sigmoid(swiglu_alpha * gate)."""
    if activation == "swiglu":
        gate, up = h.unflatten(-1, (-1, 2)).unbind(-1)
        if swiglu_limit is None:
            return F.silu(gate) * up
        gate = gate.clamp(max=swiglu_limit)
        up = up.clamp(min=-swiglu_limit, max=swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * swiglu_alpha))
    return F.gelu(h)


def in_width(d_ff: int, activation: str) -> int:
    """Width of the input projection: SwiGLU projects to gate and up at once (interleaved, see `activate`)."""
    return 2 * d_ff if activation == "swiglu" else d_ff


class MLP(nn.Module):
    """A dense FFN without biases, the same function as one routed expert (residual and shared experts)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", swiglu_limit: float | None = None,
                 swiglu_alpha: float = 1.702):
        super().__init__()
        self.activation = activation
        self.swiglu_limit, self.swiglu_alpha = swiglu_limit, swiglu_alpha
        self.w_in = nn.Linear(d_model, in_width(d_ff, activation), bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in.weight, std=std)
        nn.init.normal_(self.w_out.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activate(self.w_in(x), self.activation, self.swiglu_limit, self.swiglu_alpha))


class GroupedExperts(nn.Module):
    """This process's routed experts: `w_in` [E_local, d, f or 2f], `w_out` [E_local, f, d]; with `bias`
    (GPT-OSS) also `b_in` [E_local, f or 2f] and `b_out` [E_local, d], added after each projection.

    `w_in`'s SwiGLU columns are interleaved (gate_0, up_0, ...; see `activate`): transformers' GPT-OSS
    `gate_up_proj` [E, d, 2f] (gate at even, up at odd columns) is `w_in` as it is, `gate_up_proj_bias`
    [E, 2f] is `b_in`, `down_proj` [E, f, d] is `w_out`, `down_proj_bias` [E, d] is `b_out` (`gpt_oss_weights`).

    `expert_offset` is the global id of local expert 0; expert parallelism keeps a dim-0 slice of each
    parameter as a DTensor (`distill.parallel.parallelize.shard_experts`, which also swaps the local tensors
    in for the forward). Every expert parameter lives in a module of this class, so a layout can find them.
    """

    def __init__(
        self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu", use_grouped_mm: bool = True,
        bias: bool = False, swiglu_limit: float | None = None, swiglu_alpha: float = 1.702,
    ):
        super().__init__()
        self.activation = activation
        self.swiglu_limit, self.swiglu_alpha = swiglu_limit, swiglu_alpha
        self.use_grouped_mm = use_grouped_mm
        self.expert_offset = 0
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, in_width(d_ff, activation)))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_in = nn.Parameter(torch.zeros(num_experts, in_width(d_ff, activation))) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None

    @property
    def num_local_experts(self) -> int:
        return self.w_in.shape[0]

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std)
        if self.b_in is not None:
            nn.init.zeros_(self.b_in)
            nn.init.zeros_(self.b_out)

    def act(self, h: torch.Tensor) -> torch.Tensor:
        return activate(h, self.activation, self.swiglu_limit, self.swiglu_alpha)

    def grouped_mm_applies(self, x: torch.Tensor) -> bool:
        """grouped_mm needs fp32/bf16/fp16 (bf16 on accelerators) and 16-byte aligned row strides."""
        if not self.use_grouped_mm or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if x.device.type != "cpu" and x.dtype != torch.bfloat16:
            return False
        row_elems = 16 // x.element_size()
        d, f = self.w_out.shape[2], self.w_out.shape[1]
        return d % row_elems == 0 and f % row_elems == 0

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, d] grouped by local expert (`counts` [E_local] rows each, summing to N) -> [N, d]."""
        w_in, w_out, b_in, b_out = self.w_in, self.w_out, self.b_in, self.b_out
        if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not on autocast's lists
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w_in, w_out = x.to(dtype), w_in.to(dtype), w_out.to(dtype)
            if b_in is not None:
                b_in, b_out = b_in.to(dtype), b_out.to(dtype)
        if self.grouped_mm_applies(x):
            offs = counts.cumsum(0).to(torch.int32)
            h = F.grouped_mm(x.contiguous(), w_in, offs=offs)
            if b_in is not None:
                h = h + b_in.repeat_interleave(counts, dim=0, output_size=x.shape[0])
            out = F.grouped_mm(self.act(h), w_out, offs=offs)
            if out.requires_grad:  # grouped_mm's backward rejects stride-0 (expanded) gradients
                out.register_hook(torch.Tensor.contiguous)
            if b_out is not None:
                out = out + b_out.repeat_interleave(counts, dim=0, output_size=x.shape[0])
            return out
        chunks = x.split(counts.tolist())
        if b_in is None:
            return torch.cat([self.act(xe @ w1) @ w2 for xe, w1, w2 in zip(chunks, w_in.unbind(0), w_out.unbind(0))])
        return torch.cat([
            (self.act(xe @ w1 + c1) @ w2 + c2)
            for xe, w1, w2, c1, c2 in zip(chunks, w_in.unbind(0), w_out.unbind(0), b_in.unbind(0), b_out.unbind(0))
        ])
