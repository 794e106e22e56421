"""Tensor parallelism (Megatron style) over the mesh dimension ``tp``, applied from outside the model with
DTensor parallel styles (docs/architecture.md, "Parallel layouts").

Every rank of a tensor-parallel group holds the same tokens (the same micro-batch) and a slice of each
large weight:

- attention: ``c_attn`` column-parallel (whole key/value-head groups per rank: `distill.models.fused`),
  ``c_proj`` row-parallel (its output all-reduced);
- the dense MLP (``c_fc`` / ``c_proj``) and a MoE layer's residual ``mlp`` and ``shared_mlp``
  (``w_in`` / ``w_out``): column then row;
- the routed experts: each expert's hidden units (``w_in`` dim 2, ``w_out`` dim 1), "tensor-expert";
  `distill.parallel.tensor_experts.TensorExpertDispatcher` sums their partial outputs over ``tp``, or,
  with duplicate token dropping, sends only this rank's share of the rows through the expert all-to-all;
- ``wte`` vocabulary-parallel (an Embedding under `RowwiseParallel`), ``lm_head`` column-parallel with its
  logits left sharded on the vocabulary as a DTensor: `distill.models.loss.lm_loss` and the KD losses
  reduce per-token scalars over ``tp`` (`distill.parallel.vocab`) and never gather the vocabulary.

Norms, routers and the small gating layers stay whole on every rank of the group: their inputs and their
gradients are the same on all of them.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from distill.errors import ConfigError
from distill.models.config import ModelConfig
from distill.moe import MoELayer


def check_tensor_parallel(cfg: ModelConfig, tp: int, key: str = "parallel") -> None:
    """ConfigError naming ``<key>.tp`` unless `tp` divides every size tensor parallelism splits: the query and
    key/value heads (whole query groups per rank), the vocabulary, the dense MLPs' hidden size and the
    experts' (routed, residual, shared). Config only: runs before any model or process exists."""
    if tp == 1:
        return
    moe = cfg.moe
    expert_ff = moe.d_ff if moe.d_ff is not None else cfg.ffn_dim
    sizes = [("model.n_heads", cfg.n_heads), ("model.n_kv_heads", cfg.kv_heads), ("model.vocab_size", cfg.vocab_size)]
    if cfg.num_moe_layers < cfg.n_layers:
        sizes.append(("model.d_ff", cfg.ffn_dim))
    if cfg.num_moe_layers:
        sizes.append(("model.moe.d_ff", expert_ff))
        if moe.num_shared_experts:
            sizes.append(("model.moe.shared_d_ff", moe.shared_d_ff or moe.num_shared_experts * expert_ff))
    for name, size in sizes:
        if size % tp:
            fix = f"use a {key}.tp that divides {size}"
            if name == "model.vocab_size":  # Megatron pads the vocabulary to a multiple of 128 x tp
                padded = -(-size // (128 * tp)) * 128 * tp
                fix += f", or a vocabulary padded to a multiple of it (e.g. {padded}: 128 x {key}.tp)"
            raise ConfigError(f"{key}.tp", f"{key}.tp={tp} does not divide {name}={size}: tensor parallelism "
                              "splits it evenly over the tp ranks.", fix + ".")


# ------------------------------------------------------------------------------------------ dense modules


def block_plan(block: nn.Module, sequence_parallel: bool = False) -> dict[str, Any]:
    """The parallel style of each tensor-parallel module of a block (names relative to the block).

    With `sequence_parallel` the residual stream between the column- and row-parallel layers is split on the
    sequence over ``tp`` (Megatron's sequence parallelism): the norms work on their rank's positions, the
    column-parallel inputs are all-gathered and the row-parallel outputs reduce-scattered (the all-reduce's
    bytes, in two halves). A MoE layer takes the whole sequence (its routing, capacity and balancing loss
    are those of the micro-batch) and hands back its rank's positions."""
    seq = sequence_parallel
    col = ColwiseParallel(input_layouts=Shard(1)) if seq else ColwiseParallel()
    row = RowwiseParallel(output_layouts=Shard(1)) if seq else RowwiseParallel()
    plan: dict[str, Any] = {"attn.c_attn": col, "attn.c_proj": row}
    ffn = getattr(block, "ffn", None)
    if isinstance(ffn, MoELayer):
        for name in ("mlp", "shared_mlp"):
            if getattr(ffn, name) is not None:
                plan[f"ffn.{name}.w_in"] = ColwiseParallel()
                plan[f"ffn.{name}.w_out"] = RowwiseParallel()
        if seq:
            plan["ffn"] = PrepareModuleInputOutput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                output_layouts=(Replicate(), None), desired_output_layouts=(Shard(1), None), use_local_output=True)
    else:
        plan.update({"ffn.c_fc": col, "ffn.c_proj": row})
    if seq:
        plan.update({"ln_1": SequenceParallel(), "ln_2": SequenceParallel()})
    return plan


def tensor_parallel_dense(model: nn.Module, tp_mesh: Any, sequence_parallel: bool = False) -> None:
    """Shard the dense weights of a GPT over `tp_mesh` (1-D) in place: every block, the vocabulary-parallel
    embedding and head. A tied head stays tied (one DTensor, sharded on the vocabulary). With
    `sequence_parallel`, the residual stream is split on the sequence between them (`block_plan`)."""
    seq = sequence_parallel
    tied = model.lm_head.weight is model.wte.weight
    for block in model.blocks:
        parallelize_module(block, tp_mesh, block_plan(block, seq))
    plan = {
        "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1) if seq else Replicate()),
        "lm_head": ColwiseParallel(input_layouts=Shard(1) if seq else Replicate(), output_layouts=Shard(-1),
                                   use_local_output=False),
    }
    if seq:
        plan["ln_f"] = SequenceParallel()
        model.register_forward_pre_hook(partial(_check_sequence, tp=tp_mesh.size()))
    parallelize_module(model, tp_mesh, plan)
    if tied:
        model.lm_head.weight = model.wte.weight


def _check_sequence(module: nn.Module, args: tuple, tp: int) -> None:
    length = args[0].shape[1]
    if length % tp:
        raise ValueError(f"parallel.sequence_parallel splits the sequence over parallel.tp={tp} ranks, but a batch "
                         f"has {length} positions: use a data.seq_len that is a multiple of {tp}.")


def tp_sharded(p: Any) -> bool:
    """Whether a parameter is split over the mesh dimension ``tp`` (else every rank of a tp group holds it whole)."""
    mesh = getattr(p, "device_mesh", None)
    names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
    return "tp" in names and p.placements[names.index("tp")].is_shard()


def expert_tp_dim(name: str) -> int:
    """The dim of a stacked expert parameter that holds its hidden units (split over ``tp``)."""
    return 2 if name == "w_in" else 1
