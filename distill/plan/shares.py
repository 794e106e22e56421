"""Parameters on the mesh: every parameter tensor of the model as a `Share` (its shape on a rank after tensor
and expert parallelism, sharded by FSDP like ``torch.chunk``), from the layout rules `TP_RULES` (dense
parameters) and `EXPERTS` (routed experts), and the parameter elements a rank holds given its mesh coordinates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from distill.models import GPT
from distill.models.config import ModelConfig
from distill.moe import MoELayer
from distill.parallel.config import ParallelConfig
from distill.parallel.mesh import layer_group_size

# Tensor parallelism of the dense parameters (the contract of distill/parallel): the dim `tp` splits, or None
# (replicated over tp). Every parameter of a GPT matches one rule; the routed experts have their own.
TP_RULES: tuple[tuple[str, int | None], ...] = (
    (r"(wte|lm_head)\.weight", 0),  # vocabulary rows (tied: one tensor)
    (r"blocks\.\d+\.attn\.c_attn\.(weight|bias)", 0),  # column-parallel: heads
    (r"blocks\.\d+\.attn\.c_proj\.weight", 1),  # row-parallel
    (r"blocks\.\d+\.ffn\.c_fc\.(weight|bias)", 0),  # the dense MLP
    (r"blocks\.\d+\.ffn\.c_proj\.weight", 1),
    (r"blocks\.\d+\.ffn\.(mlp|shared_mlp)\.w_in\.weight", 0),  # the residual MLP, the shared experts
    (r"blocks\.\d+\.ffn\.(mlp|shared_mlp)\.w_out\.weight", 1),
    (r"blocks\.\d+\.(attn|ffn)\.c_proj\.bias", None),  # row-parallel biases
    (r"(blocks\.\d+\.ln_[12]|ln_f)\.(weight|bias)", None),  # norms
    (r"blocks\.\d+\.ffn\.(router\.weight|coef\.(weight|bias)|shared_gate\.weight)", None),
)
EXPERTS = re.compile(r"(blocks\.\d+\.ffn\.experts)\.(w_in|w_out)")


@dataclass(frozen=True)
class Share:
    """One parameter tensor on the mesh: its shape on a rank after tensor and expert parallelism (`local`),
    sharded by FSDP over `group` ranks on dim `dim` like ``torch.chunk`` (ceil(rows / group) rows each)."""

    name: str
    unit: str  # its FSDP unit: "root", "blocks.<i>" or "blocks.<i>.ffn.experts"
    local: tuple[int, ...]
    dim: int
    group: int
    expert_group: int = 0  # g of an expert tensor (its FSDP index is the dense one // g); 0: dense

    def numel(self, index: int) -> int:
        """Elements held by the rank at position `index` of the FSDP group."""
        rows = self.local[self.dim]
        chunk = -(-rows // self.group)
        return max(0, min(chunk, rows - index * chunk)) * math.prod(self.local) // max(rows, 1)

    @property
    def padded(self) -> int:
        """Elements of the gathered tensor with FSDP's padding (group x the largest shard)."""
        return self.group * self.numel(0)

    def index(self, dense_index: int) -> int:
        return dense_index // self.expert_group if self.expert_group else dense_index


def tp_dim(name: str) -> int | None:
    """The dim tensor parallelism splits of the dense parameter `name`, or None (replicated)."""
    for pattern, dim in TP_RULES:
        if re.fullmatch(pattern, name):
            return dim
    raise ValueError(f"the planner has no layout rule for the parameter {name!r}: add it to distill.plan.TP_RULES "
                     "(and to the tensor-parallel layout of distill/parallel).")


def meta_model(cfg: ModelConfig) -> GPT:
    """The GPT of `cfg` on the meta device: the real modules, no memory."""
    with torch.device("meta"):
        return GPT(cfg)


def shares(model: GPT, layout: ParallelConfig) -> list[Share]:
    """Every parameter tensor of `model` (tied ones once) on the mesh of `layout` (resolved)."""
    tp, dense = layout.tp, layout.dp_shard * layout.ep
    groups = {name: layer_group_size(layer.num_experts, layout.ep)
              for name, layer in model.named_modules() if isinstance(layer, MoELayer)}
    out = []
    for name, p in model.named_parameters():  # a tied head is the embedding's tensor: named once
        shape = list(p.shape)
        match = EXPERTS.fullmatch(name)
        if match:
            g = groups[match.group(1).removesuffix(".experts")]
            shape[0] //= g
            w_in = match.group(2) == "w_in"
            shape[2 if w_in else 1] //= tp
            fsdp_dim = 1 if w_in or tp == 1 else 2
            out.append(Share(name, match.group(1), tuple(shape), fsdp_dim, dense // g, g))
            continue
        dim = tp_dim(name)
        if dim is not None:
            shape[dim] //= tp
        unit = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else "root"
        out.append(Share(name, unit, tuple(shape), 0, dense))
    return out


def param_numel(plan_shares: Iterable[Share], layout: ParallelConfig, rank: int) -> int:
    """Parameter elements held by global `rank` (row-major dp_replicate x dp_shard x ep x tp)."""
    q = (rank // layout.tp) % (layout.dp_shard * layout.ep)
    return sum(s.numel(s.index(q)) for s in plan_shares)
