"""Communication per rank per step: the ring-algorithm bytes of each collective (FSDP all-gathers and
reduce-scatters per unit, data-parallel and tensor-parallel all-reduces, the expert all-to-alls and, with
duplicate token dropping, the tensor-parallel all-gathers and reduce-scatters around them), and per group of
MoE layers an `AllToAll`: its rows, bytes, messages and cross-node bytes, flat and hierarchical.

`parallel.sequence_parallel` (tp > 1, `distill.parallel.tensor.block_plan`) turns each tp all-reduce of the
residual stream (T·d) into an all-gather and a reduce-scatter of the same size (half the bytes each): the
column-parallel inputs (attention, dense MLP, head) are all-gathered in the forward and reduce-scattered in the
backward, the row-parallel outputs and the embedding's reduce-scattered in the forward and all-gathered in the
backward. A MoE layer adds an all-gather of its input in the forward and of its output's gradient in the
backward (it routes the whole micro-batch; inside it nothing changes). The norms' weight gradients, summed
over tp (all-reduces of d or 2d numbers per norm), are left out like the other small exchanges.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.models import GPT
from distill.models.config import ModelConfig
from distill.parallel.config import ParallelConfig
from distill.parallel.mesh import layer_group_size
from distill.plan.activations import _dtype_bytes, _routed_rows, sequence_parallel
from distill.plan.shares import Share

COLLECTIVES = ("all-reduce tp", "all-reduce dp", "all-gather fsdp", "reduce-scatter fsdp", "all-to-all ep",
               "all-gather tp", "reduce-scatter tp")


@dataclass
class AllToAll:
    """The all-to-alls of the MoE layers with the same experts and group: per rank, per all-to-all."""

    layers: int
    experts: int
    g: int
    rows: float  # routed rows one rank sends (its share: / tp with duplicate token dropping)
    bytes: float  # to the other ranks of the group: rows x d x (g-1)/g
    per_step: int  # all-to-alls per layer per step (dispatch and combine, forward and backward, recomputed)
    node: int | None  # J: group ranks per node (parallel.ep_intra, else trainer.devices / tp); None: unknown
    cross_bytes: float  # bytes that leave the node: rows x d x (g-J)/g
    flat_messages: int
    flat_cross: int  # of them, to other nodes
    hier_messages: int | None  # (J-1) + (g/J-1), None when not hierarchical (J >= g or J does not divide g)
    hier_cross: int | None



def _ring(n: int) -> float:
    return (n - 1) / n


def _units(plan_shares: list[Share]) -> dict[str, tuple[int, int]]:
    """FSDP unit -> (group size, padded elements)."""
    units: dict[str, tuple[int, int]] = {}
    for s in plan_shares:
        n, padded = units.get(s.unit, (s.group, 0))
        units[s.unit] = (n, padded + s.padded)
    return units


def communication(model: GPT, layout: ParallelConfig, plan_shares: list[Share], micro_batch: int, seq_len: int,
                  dup: bool, node: int | None) -> tuple[dict[str, float], list[AllToAll]]:
    """Bytes per rank per step (one micro-batch, forward and backward) of each collective, and the all-to-alls;
    with (`dup`) or without duplicate token dropping. `node`: expert-parallel ranks per node (J)."""
    cfg: ModelConfig = model.cfg
    lay, tp = layout, layout.tp
    e, pb, rb = _dtype_bytes(lay.param_dtype), _dtype_bytes(lay.param_dtype), _dtype_bytes(lay.reduce_dtype)
    T, d = micro_batch * seq_len, cfg.d_model
    c = dict.fromkeys(COLLECTIVES, 0.0)
    for unit, (n, padded) in _units(plan_shares).items():
        gathers = 2 if lay.reshard_after_forward and unit != "root" else 1  # the root stays gathered
        c["all-gather fsdp"] += gathers * _ring(n) * padded * pb
        c["reduce-scatter fsdp"] += _ring(n) * padded * rb
        c["all-reduce dp"] += 2 * _ring(lay.dp_replicate) * padded / n * rb  # HSDP: the shard over the replicas

    def tp_all_reduce(size: float, times: int) -> None:
        c["all-reduce tp"] += times * 2 * _ring(tp) * size

    sp = sequence_parallel(lay)

    def residual(size: float, times: int) -> None:
        """`times` tp all-reduces of the residual stream; with sequence parallelism as many all-gathers and
        reduce-scatters."""
        if not sp:
            tp_all_reduce(size, times)
            return
        c["all-gather tp"] += times * _ring(tp) * size
        c["reduce-scatter tp"] += times * _ring(tp) * size

    x = T * d * e
    ckpt = lay.activation_checkpointing
    a2a: dict[tuple[int, int], AllToAll] = {}
    for block in model.blocks:
        attn_fwd = 1 + (ckpt != "none")  # its forward again in the backward: full and moe_only recompute attention
        ffn_fwd = 1 + (ckpt == "full" or (ckpt == "moe_only" and not block.is_moe))
        residual(x, attn_fwd + 1)  # after c_proj (forward); c_attn's input gradient (backward)
        if not block.is_moe:
            residual(x, ffn_fwd + 1)
            continue
        layer = block.ffn
        if sp:  # its input gathered to the whole sequence (forward); its output's gradient (backward)
            c["all-gather tp"] += (ffn_fwd + 1) * _ring(tp) * x
        for branch in (layer.mlp, layer.shared_mlp):
            if branch is not None:
                tp_all_reduce(x, ffn_fwd + 1)
        g = layer_group_size(layer.num_experts, lay.ep)
        R = _routed_rows(layer, T)
        rows_bytes = R * d * e
        if dup and tp > 1 and g > 1:  # 1/tp of the rows each; all-gathers / reduce-scatters over tp restore them
            sent = R / tp
            c["all-gather tp"] += (2 * ffn_fwd + 1) * _ring(tp) * rows_bytes  # after dispatch, combine; dispatch's bwd
            c["reduce-scatter tp"] += (ffn_fwd + 1) * _ring(tp) * rows_bytes  # before combine; dispatch's backward
        else:
            sent = R
            tp_all_reduce(rows_bytes, ffn_fwd + 1)  # the experts' row-parallel output; their input gradient
        if g == 1:
            continue
        per_step = 2 * ffn_fwd + 2
        bytes_ = sent * d * e * _ring(g)
        c["all-to-all ep"] += per_step * bytes_
        key = (layer.num_experts, g)
        if key in a2a:
            a2a[key].layers += 1
            continue
        J = node if node is not None and node < g else None
        hier = J is not None and g % J == 0 and J > 1
        a2a[key] = AllToAll(
            layers=1, experts=layer.num_experts, g=g, rows=sent, bytes=bytes_, per_step=per_step, node=node,
            cross_bytes=sent * d * e * (g - J) / g if J else 0.0, flat_messages=g - 1, flat_cross=g - J if J else 0,
            hier_messages=(J - 1) + (g // J - 1) if hier else None, hier_cross=g // J - 1 if hier else None)
    residual(x, 1)  # the vocabulary-parallel embedding's output (SP: its reduce-scatter, the gradient's gather)
    residual(x, 1)  # the head's input gradient, its output vocabulary-parallel (SP: its input's gather, the RS)
    tp_all_reduce(T * 4, 3)  # vocabulary-parallel cross-entropy: max, sum of exponentials, target logit
    return c, list(a2a.values())
