"""The plan as text: the model and the layout, the assumptions, the memory table of the largest rank (against
`plan.device_memory_gb` when set) and the communication table with the all-to-alls' messages, with and without
duplicate token dropping; and the number formatting (GiB, parameter counts).
"""

from __future__ import annotations

from distill.parallel.mesh import layer_group_size
from distill.plan.activations import sequence_parallel
from distill.plan.comm import COLLECTIVES
from distill.plan.layout import LayoutPlan

GiB = 2**30


def _gib(n: float) -> str:
    return f"{n / GiB:10.3f}"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_plan(plan: LayoutPlan, device_memory_gb: float | None = None) -> str:
    cfg, lay = plan.model, plan.layout
    T = plan.micro_batch * plan.seq_len
    nodes = plan.world // plan.devices
    sp = f" with sequence parallelism (norms, dropout on T/tp={T // lay.tp:,} positions)" if sequence_parallel(lay) else ""
    lines = [f"model {cfg.name}: {_count(plan.total_params)} parameters ({plan.total_params:,}), "
             f"{_count(plan.active_params)} active per token",
             f"layout {lay.describe()}{sp} on {plan.world} ranks ({nodes} node{'s' * (nodes > 1)} x {plan.devices}); ranks "
             "row-major dp_replicate x dp_shard x ep x tp (tp innermost)"]
    n_dense = lay.dp_shard * lay.ep
    lines.append(f"  dense parameters: tp={lay.tp}, then FSDP over {n_dense} ranks (dp_shard x ep)"
                 + (f", {lay.dp_replicate} replicas (HSDP)" if lay.dp_replicate > 1 else ""))
    for E in sorted(set(cfg.num_experts)):
        g = layer_group_size(E, lay.ep)
        lines.append(f"  {cfg.num_experts.count(E)} MoE layer(s) of {E} experts: {g} rank(s) split them "
                     f"({E // g} each), tp={lay.tp} splits each expert's hidden size, FSDP over {n_dense // g}")
    dtype = lay.param_dtype or "float32"
    lines.append(f"micro-batch {plan.micro_batch} x {plan.seq_len} tokens per tp group (T={T:,} per rank); "
                 f"activations and all-gathers in {dtype}, gradients reduced in {lay.reduce_dtype}; activation "
                 f"checkpointing {lay.activation_checkpointing}")
    lines.append("assumptions: fp32 master weights and gradients, AdamW (2 fp32 states); uniform routing for the "
                 "all-to-all")
    m, s = plan.memory, plan.smallest
    alike = m.total == s.total
    head = "per rank" if alike else "largest rank"
    lines += ["", f"memory {head}{'' if alike else f' ({plan.largest_ranks} of {plan.world} ranks; uneven FSDP shards: the smallest holds {(m.total - s.total):,} bytes less)'}",
              f"  {'':24s} {'GiB':>10s} {'bytes':>20s}"]
    for label, value in (("parameters (fp32)", m.params), ("gradients (fp32)", m.grads),
                         ("optimizer states", m.optimizer), ("activations", m.activations),
                         ("transient (gathered)", m.transient), ("total", m.total)):
        lines.append(f"  {label:24s} {_gib(value)} {value:20,d}")
    if device_memory_gb is not None:
        verdict = "fits" if m.total <= device_memory_gb * GiB else "does NOT fit"
        lines.append(f"  {'device memory':24s} {device_memory_gb:10.3f} {int(device_memory_gb * GiB):20,d}  {verdict}")
    parts = {k: v for k, v in plan.activation_parts.items() if k != "total" and v}
    lines.append("  activations: " + ", ".join(f"{k} {v / GiB:.3f}" for k, v in parts.items()) + " GiB; transient: "
                 "the root's and the largest block's gathered parameters, its unsharded gradients, the logits' gradient")
    on = plan.drop_duplicate_tokens
    lines += ["", "communication per rank per step (one micro-batch, forward + backward; bytes sent or received)",
              f"  {'collective':22s} {'dup. dropping on' + ' *' * on:>22s} {'dup. dropping off' + ' *' * (not on):>22s}"]
    for name in COLLECTIVES:
        lines.append(f"  {name:22s} {plan.comm[True][name]:22,.0f} {plan.comm[False][name]:22,.0f}")
    lines.append(f"  {'total':22s} {sum(plan.comm[True].values()):22,.0f} {sum(plan.comm[False].values()):22,.0f}")
    lines.append(f"  (* parallel.drop_duplicate_tokens={str(on).lower()}; it changes nothing at tp=1 or without "
                 "expert parallelism)")
    for a_on, a_off in zip(plan.alltoall[True], plan.alltoall[False]):
        lines.append(f"  all-to-all, {a_on.layers} layer(s) of {a_on.experts} experts over g={a_on.g}: "
                     f"{a_on.per_step} per layer per step; per all-to-all {a_on.rows:,.0f} / {a_off.rows:,.0f} rows, "
                     f"{a_on.bytes:,.0f} / {a_off.bytes:,.0f} bytes (dup. dropping on / off)")
        runs = a_on.hier_messages is not None and lay.ep_intra is not None  # the hierarchical one runs
        flat = f"flat{' *' * (not runs)} {a_on.flat_messages} messages ({a_on.flat_cross} to other nodes)"
        if a_on.hier_messages is not None:
            hier = (f"hierarchical{' *' * runs} (J={a_on.node}) {a_on.hier_messages} = {a_on.node - 1} + "
                    f"{a_on.g // a_on.node - 1} messages ({a_on.hier_cross} to other nodes)")
        elif a_on.node is None or a_on.node >= a_on.g:
            hier = "hierarchical: n/a (the group is within one node)"
        else:
            hier = f"hierarchical: n/a ({a_on.node} ranks per node do not divide g={a_on.g})"
        cross = f"crossing nodes {a_on.cross_bytes:,.0f} / {a_off.cross_bytes:,.0f} bytes either way"
        lines.append(f"    messages per rank per all-to-all: {flat}; {hier}; {cross}")
    if any(a.hier_messages is not None for a in plan.alltoall[True]):
        lines.append("    (* runs: " + (f"parallel.ep_intra={lay.ep_intra}" if lay.ep_intra is not None else
                                         f"parallel.ep_intra is null; hierarchical is what parallel.ep_intra="
                                         f"{plan.alltoall[True][0].node} would do") + ")")
    return "\n".join(lines)
