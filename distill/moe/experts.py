"""Expert MLPs: a dense FFN and the routed experts stored as stacked parameters ([E, d, f], [E, f, d]).

The routed experts compute over rows already grouped by expert (`counts[e]` consecutive rows each):
with `torch.nn.functional.grouped_mm` where dtype and shapes allow, else with split + a loop over
`weight.unbind(0)` (never `w[e]` in a loop: each index's backward allocates a full-size zero gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """GELU on h [.., f], or SwiGLU on h [.., 2f] -> silu(gate) * up.

    SwiGLU's gate and up units are interleaved (gate_0, up_0, gate_1, up_1, ...), so that any contiguous
    slice of whole pairs is a smaller SwiGLU of its own: a tensor-parallel rank's slice of the input
    projection computes its slice of the hidden units (`distill.parallel.tensor`)."""
    if activation == "swiglu":
        gate, up = h.unflatten(-1, (-1, 2)).unbind(-1)
        return F.silu(gate) * up
    return F.gelu(h)


def in_width(d_ff: int, activation: str) -> int:
    """Width of the input projection: SwiGLU projects to gate and up at once (interleaved, see `activate`)."""
    return 2 * d_ff if activation == "swiglu" else d_ff


class MLP(nn.Module):
    """A dense FFN without biases, the same function as one routed expert (residual and shared experts)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu"):
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d_model, in_width(d_ff, activation), bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in.weight, std=std)
        nn.init.normal_(self.w_out.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))


class GroupedExperts(nn.Module):
    """This process's routed experts: `w_in` [E_local, d, f or 2f], `w_out` [E_local, f, d].

    `expert_offset` is the global id of local expert 0; expert parallelism keeps a dim-0 slice of each
    parameter as a DTensor (`distill.parallel.parallelize.shard_experts`, which also swaps the local tensors
    in for the forward). Every expert parameter lives in a module of this class, so a layout can find them.
    """

    def __init__(
        self, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu", use_grouped_mm: bool = True
    ):
        super().__init__()
        self.activation = activation
        self.use_grouped_mm = use_grouped_mm
        self.expert_offset = 0
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, in_width(d_ff, activation)))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))

    @property
    def num_local_experts(self) -> int:
        return self.w_in.shape[0]

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std)

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
        w_in, w_out = self.w_in, self.w_out
        if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not on autocast's lists
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w_in, w_out = x.to(dtype), w_in.to(dtype), w_out.to(dtype)
        if self.grouped_mm_applies(x):
            offs = counts.cumsum(0).to(torch.int32)
            h = activate(F.grouped_mm(x.contiguous(), w_in, offs=offs), self.activation)
            out = F.grouped_mm(h, w_out, offs=offs)
            if out.requires_grad:  # grouped_mm's backward rejects stride-0 (expanded) gradients
                out.register_hook(torch.Tensor.contiguous)
            return out
        chunks = x.split(counts.tolist())
        outs = [
            activate(xe @ w1, self.activation) @ w2
            for xe, w1, w2 in zip(chunks, w_in.unbind(0), w_out.unbind(0))
        ]
        return torch.cat(outs)
