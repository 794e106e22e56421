"""Hydra app: plan a parallel layout before running it, from the model's real modules and the layout rules.

    python -m distill.plan model=1.3b_prmoe64_128 parallel.tp=2 parallel.ep=8 parallel.dp_shard=4 \\
        trainer.num_nodes=8 trainer.devices=8 [plan.device_memory_gb=80]

builds the model on the meta device (no memory, no process group) and prints, per rank, the bytes of the
parameters, gradients and AdamW states, an activation estimate for one micro-batch (`data.batch_size` x
`data.seq_len`, as in training) and the transient all-gathered parameters; then, per step, the bytes each
collective moves with and without duplicate token dropping, and the all-to-all's messages and cross-node
bytes flat and hierarchical. With `plan.device_memory_gb` set, a layout whose largest rank needs more is
refused (exit 2, after the tables) with the layouts of the same world that would fit.

The layout rules (docs/architecture.md, "Parallel layouts"; mirrored here, checked against measured
shards by tests/test_plan.py):

- World ``W = dp_replicate x dp_shard x ep x tp``, ranks row-major with ``tp`` innermost; the ``tp`` ranks
  of a group share one micro-batch (data-parallel degree ``W / tp``).
- Dense parameters: tensor-parallel over ``tp`` (`TP_RULES`: attention ``c_attn`` rows / ``c_proj`` columns,
  the dense MLPs' input rows / output columns, ``wte`` and ``lm_head`` vocabulary rows; norms, routers,
  mixing coefficients and row-parallel biases replicated), then FSDP over the ``dp_shard x ep`` ranks of a
  replica on dim 0 of the tensor-parallel shard.
- Routed experts of a layer with E experts: ``g = min(ep, E)`` ranks split dim 0, ``tp`` splits each expert's
  hidden dim (``w_in`` dim 2, ``w_out`` dim 1), FSDP shards over ``edp = dp_shard x ep / g`` ranks (``w_in``
  dim 1; ``w_out`` dim 2 when tp > 1, else dim 1).
- FSDP shards like ``torch.chunk``: ``ceil(rows / n)`` rows per rank, the last ranks fewer (or none).

Assumptions (printed with the plan): fp32 master weights and gradients, AdamW (two fp32 states and a step
counter per tensor), activations and all-gathers in ``parallel.param_dtype`` (fp32 when null), gradients
reduced in ``parallel.reduce_dtype``, uniform routing for the all-to-all. Collective volumes are the ring
algorithm's bytes per rank: all-reduce ``2 (n-1)/n x size``, all-gather and reduce-scatter ``(n-1)/n x size``
(the size of the whole gathered tensor); all-to-all: the bytes a rank sends to other ranks. The small
exchanges (row counts, loss scalars, the gradient norm) are left out, except the vocabulary-parallel
cross-entropy's three all-reduces of one number per token. With ``parallel.sequence_parallel`` (tp > 1) the
residual stream's all-reduces over tp become all-gathers and reduce-scatters of the same size (a MoE layer adds
an all-gather of its input and one of its output's gradient), and the norms and dropout keep 1/tp of the
positions (`distill.plan.comm`, `distill.plan.activations`).
"""

from __future__ import annotations

from distill.plan.activations import DTYPE_BYTES, activation_bytes
from distill.plan.app import PlanSpec, check_fits, main, resolve_plan
from distill.plan.comm import COLLECTIVES, AllToAll, communication
from distill.plan.layout import ADAMW_STATES, STEP_BYTES, LayoutPlan, Memory, plan_layout
from distill.plan.report import GiB, format_plan
from distill.plan.shares import EXPERTS, TP_RULES, Share, meta_model, param_numel, shares, tp_dim

__all__ = [
    "ADAMW_STATES", "COLLECTIVES", "DTYPE_BYTES", "EXPERTS", "STEP_BYTES", "TP_RULES", "AllToAll", "GiB",
    "LayoutPlan", "Memory", "PlanSpec", "Share", "activation_bytes", "check_fits", "communication", "format_plan",
    "main", "meta_model", "param_numel", "plan_layout", "resolve_plan", "shares", "tp_dim",
]
