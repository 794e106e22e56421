"""MoE layer speed on CPU: forward+backward time relative to a dense FFN with the same active parameters.

For T tokens, width d, expert hidden f, E experts and top-k, the dense baseline is an FFN of hidden
size k*f on the same tokens (same FLOPs as the routed experts, so about 1.0 is the physical limit).
Compared: the experts alone on pre-grouped rows (their matmuls and activation: the floor of the MoE layer on
this CPU, as E smaller matmuls each read their own weights), the MoE layer (dropless, with its CPU expert
kernel and with the loop reference; and with capacity factor 1.25) and the one-hot einsum (GShard-style)
dispatch of older systems with capacity factor 1.25, as the baseline to beat. Each MoE / dense ratio is recorded (`distill.bench.record`) with one sample per interleaved
round (`--reps N`: N rounds, default 10); the MoE layer's has the goal "<= 1.15".
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from distill.bench import fmt, ratios, record, reps, time_interleaved
from distill.moe import MLP, MoEConfig, MoELayer
from distill.moe.experts import activate

T, D, F_HIDDEN = 4096, 256, 1024
EXPERTS = (8, 32)
TOP_K = (1, 2)
CAPACITY_FACTOR = 1.25


def einsum_moe(layer: MoELayer, x: torch.Tensor, capacity_factor: float) -> torch.Tensor:
    """GShard-style one-hot dispatch: [T, E, C] dispatch/combine tensors and einsums (O(T*E*C)); the
    same router and expert weights as `layer`. Choices claim slots in (choice, token) order."""
    routing = layer.router(x)
    num_tokens, k = routing.expert_idx.shape
    E = layer.num_experts
    C = max(layer.cfg.min_capacity, math.ceil(k * capacity_factor * num_tokens / E))
    mask = F.one_hot(routing.expert_idx.t().reshape(-1), E)  # [k*T, E], first choices first
    slot = ((mask.cumsum(0) - 1) * mask).sum(-1).view(k, num_tokens).t()  # [T, k]
    keep = (slot < C).float()
    slots = F.one_hot(slot.clamp(max=C - 1), C).float()  # [T, k, C]
    experts = F.one_hot(routing.expert_idx, E).float()  # [T, k, E]
    dispatch = torch.einsum("tk,tke,tkc->tec", keep, experts, slots)
    combine = torch.einsum("tk,tke,tkc->tec", routing.gates * keep, experts, slots)
    xe = torch.einsum("tec,td->ecd", dispatch, x)
    h = activate(torch.bmm(xe, layer.experts.w_in), layer.cfg.activation)
    return torch.einsum("tec,ecd->td", combine, torch.bmm(h, layer.experts.w_out))


def bench_case(num_experts: int, k: int, rounds: int, clock: Callable[[], float]) -> dict[str, object]:
    """Ratios to the dense FFN for one (E, k): per interleaved round (lists), and the dense / MoE times."""
    torch.manual_seed(0)
    x = torch.randn(T, D, requires_grad=True)
    grad = torch.randn(T, D)
    dense = MLP(D, k * F_HIDDEN)
    dense.init_weights(0.02, 0.02)
    dropless = MoELayer(D, F_HIDDEN, num_experts, MoEConfig(top_k=k, dropless=True))
    loop = MoELayer(D, F_HIDDEN, num_experts, MoEConfig(top_k=k, dropless=True, use_grouped_mm=False))
    capped = MoELayer(D, F_HIDDEN, num_experts, MoEConfig(top_k=k, capacity_factor=CAPACITY_FACTOR))
    for layer in (loop, capped):
        layer.load_state_dict(dropless.state_dict())
    modules = [dense, dropless, loop, capped]

    def moe_step(layer: MoELayer) -> None:
        y, stats = layer(x)
        torch.autograd.backward([y, stats.aux_loss], [grad, torch.ones(())])

    def clear_grads() -> None:
        x.grad = None
        for m in modules:
            for p in m.parameters():
                p.grad = None

    def dense_step() -> None:
        dense(x).backward(grad)

    with torch.no_grad():  # the experts alone: their matmuls and activations on rows already grouped by expert
        counts = torch.bincount(dropless.router(x).expert_idx.flatten(), minlength=num_experts)
    rows = torch.randn(T * k, D, requires_grad=True)
    grad_rows = torch.randn(T * k, D)

    def experts_step() -> None:
        rows.grad = None
        dropless.experts(rows, counts).backward(grad_rows)

    fns = {
        "dense": dense_step,
        "experts": experts_step,
        "moe": lambda: moe_step(dropless),
        "loop": lambda: moe_step(loop),
        "capped": lambda: moe_step(capped),
    }
    times = time_interleaved(fns, reps=rounds, warmup=2, setup=clear_grads, clock=clock)
    # the einsum baseline is several times slower: fewer rounds, paired with its own dense runs
    slow = time_interleaved(
        {"dense": dense_step, "einsum": lambda: einsum_moe(capped, x, CAPACITY_FACTOR).backward(grad)},
        reps=max(3, rounds // 3),
        warmup=1,
        setup=clear_grads,
        clock=clock,
    )
    with torch.no_grad():
        drop = capped(x)[1].drop_fraction.item()
    row: dict[str, object] = {"dense_ms": 1e3 * statistics.median(times["dense"]), "drop": drop}
    row["moe_ms"] = 1e3 * statistics.median(times["moe"])
    for name in ("moe", "experts", "loop", "capped"):
        row[name] = ratios(times[name], times["dense"])
    row["einsum"] = ratios(slow["einsum"], slow["dense"])
    return row


def main(rounds: int | None = None) -> None:
    rounds = reps(10) if rounds is None else rounds
    print(f"MoE layer fwd+bwd / dense FFN (hidden k*f) fwd+bwd, T={T} d={D} f={F_HIDDEN}, GELU experts;")
    print(f"ratio = median over {rounds} interleaved rounds (einsum: {max(3, rounds // 3)}) after warm-up; "
          "moe: median (farthest round from it, rounds)")
    print("  moe    = MoE layer, dropless, CPU expert kernel  loop   = same, argsort+split+unbind loop")
    print("           (one mm per expert; with 2+ threads, experts side by side on 1-thread workers)")
    print("  experts = the MoE layer's experts alone on rows already grouped by expert (no router, no gather or")
    print("           scatter): what E small matmuls cost against one large one, the floor of `moe` on this CPU")
    print(
        f"  capped = MoE layer, capacity factor {CAPACITY_FACTOR}      einsum = one-hot GShard dispatch, same cf"
    )
    print("  threads=1 times are CPU time of the one compute thread (immune to waiting on a shared machine)")
    print(
        f"  THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')} (huge pages for big tensors)"
    )
    default_threads = torch.get_num_threads()
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        clock = time.thread_time if threads == 1 else time.perf_counter
        header = (
            f"{'threads':>7} {'E':>3} {'k':>2} {'dense ms':>9} {'moe ms':>7} {'moe':>22} {'loop':>6} "
            f"{'capped':>7} {'drop%':>6} {'einsum':>7} {'load':>5}"
        )
        print(header)
        print("-" * len(header))
        for num_experts in EXPERTS:
            for k in TOP_K:
                r = bench_case(num_experts, k, rounds, clock)
                case = f"E={num_experts} k={k}, {threads} thread{'s' if threads > 1 else ''}"
                record(f"MoE / dense fwd+bwd, {case}", r["moe"], goal="<= 1.15")
                med = {name: record(f"{name} / dense fwd+bwd, {case}", r[name])
                       for name in ("experts", "loop", "capped", "einsum")}
                print(
                    f"{threads:>7} {num_experts:>3} {k:>2} {r['dense_ms']:>9.1f} {r['moe_ms']:>7.1f} "
                    f"{fmt(r['moe'], 2):>22} {med['experts']:>8.2f} {med['loop']:>6.2f} {med['capped']:>7.2f} "
                    f"{100 * r['drop']:>6.1f} {med['einsum']:>7.2f} {os.getloadavg()[0]:>5.1f}",
                    flush=True,
                )
    torch.set_num_threads(default_threads)
    print(
        f"goal: moe <= 1.15 (1.0 = the dense FFN's own cost). load = 1-min load average on {os.cpu_count()} cores:"
    )
    print("  above the core count, 2-thread wall times mostly measure waiting for a descheduled thread.")
