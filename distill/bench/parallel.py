"""Parallel layouts on CPU (gloo, 4 processes standing for 4 devices): memory per rank and step time.

1. Training state per rank: bytes of the local shards of the parameters, gradients and AdamW state after
   one step of a model with 16 experts per MoE layer, for one process and for the 4-rank layouts
   dp_replicate=4 (plain DDP), dp_shard=4 (ZeRO-3), ep=4, ep=2 x dp_shard=2, tp=2 x ep=2, tp=2 x dp_shard=2.
   Exact counts (numel x element size), not resident memory. Goal: the largest rank within 5% of 1/4 of one process's total for the fully
   sharded layouts.
2. Loading a teacher exported with `export_model` (`ExportTeacher.load_sharded`) on 4 ranks: the increase of
   each rank's peak resident memory (VmHWM) over its resident memory just before the load, against loading
   it whole on one process. Goal: at most (teacher / 4 + its largest tensor) + 10%. Also split, sampled
   after every slice read: private memory (RssAnon) and the pages of the memory-mapped file (RssFile).
3. Step time (forward, backward, clipping by the full model's norm, AdamW) on the same global batch: one
   process against 4 ranks, step by step in turn (rank 0 runs the one-process step while the other ranks
   wait), wall and CPU time. Every process uses one thread; the 4 ranks share this machine's cores.
4. Expert-parallel throughput: `ep=2` on 2 processes of one thread each (two devices) against one process of
   one thread (one device), on the same global batch, step by step in turn (rank 0 runs the one-process step
   while rank 1 waits): throughput = one-process step time / ep=2 step time (the slower rank's). Goal: >= 1.6x.
   With ZeRO-3's default (`reshard_after_forward`: the dense blocks gathered again in the backward) and without.
   Also against one process of 2 threads: the same cores as the two ranks, intra-op threads instead of
   expert parallelism (context, no goal: 2 cores cannot give 1.6x of 2 cores).

Every figure is recorded (`distill.bench.record`): the per-step ratios of 3 and 4 (`--reps N`: N timed steps,
default 8), one sample for the byte counts of 1 and the memory of 2.

Processes: distill/bench/parallel_worker.py (one process per rank, started by `run_ranks`).
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

from distill.bench import fmt, ratios, record, reps

WORLD = 4
LAYOUTS = {  # label -> layout (the `parallel` config node); None: one process
    "1 process": None,
    "dp_replicate=4 (DDP)": "dp_replicate=4,dp_shard=1",
    "dp_shard=4": "dp_shard=4",
    "ep=4": "ep=4,dp_shard=1",
    "ep=2 x dp_shard=2": "ep=2,dp_shard=2",
    "tp=2 x ep=2": "tp=2,ep=2,dp_shard=1",
    "tp=2 x dp_shard=2": "tp=2,dp_shard=2",
}
SHARDED = ("dp_shard=4", "ep=4", "ep=2 x dp_shard=2")  # goal: 1/4 of one process, within 5%
TIMED = {"ep=2 x dp_shard=2": "ep=2,dp_shard=2", "dp_shard=4": "dp_shard=4"}
SCALE = {"ep=2": "ep=2,dp_shard=1",  # label -> layout, on SCALE_WORLD ranks
         "ep=2, reshard_after_forward=false": "ep=2,dp_shard=1,reshard_after_forward=false"}
SCALE_WORLD, SCALE_THREADS = 2, (1, 2)  # the one-process baselines: 1 thread (one device), 2 (the ranks' cores)
LOAD_LAYOUTS = {"ep=4": "ep=4,dp_shard=1", "dp_shard=4": "dp_shard=4"}
MB = 1e6


def run(mode: str, args: list[str], world: int, timeout: float = 300) -> Any:
    """Start the worker on `world` ranks; the JSON line rank 0 printed."""
    from distill.parallel.launch import run_ranks

    argv = [sys.executable, "-m", "distill.bench.parallel_worker", mode, *args]
    results = run_ranks(argv, world, timeout=timeout, threads=1)
    for rank, (code, out) in enumerate(results):
        if code != 0:
            raise RuntimeError(f"bench worker `{mode}` rank {rank} exited {code}:\n{out[-3000:]}")
    return json.loads(next(x for x in results[0][1].splitlines() if x.startswith("{")))


def export_teacher(out_dir: Path) -> dict[str, int]:
    """Export a random teacher to `out_dir`; its tensors' bytes (total, largest) from the file's header."""
    import torch

    from distill.bench.parallel_worker import teacher_config
    from distill.export import WEIGHTS, export_model
    from distill.models import GPT

    cfg = teacher_config()
    torch.manual_seed(0)
    export_model(GPT(cfg), cfg, out_dir)
    with open(out_dir / WEIGHTS, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    sizes = [e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__"]
    return {"total": sum(sizes), "largest": max(sizes), "tensors": len(sizes)}


def kb_to_mb(kb: int) -> float:
    return kb * 1024 / MB


def goal_of(label: str) -> str | None:
    return "within 5% of 0.25" if label in SHARDED else None


def goal_text(label: str, ratio: float) -> str:
    if label in SHARDED:
        off = ratio / 0.25 - 1
        return f"1/4 within 5%: {'yes' if abs(off) <= 0.05 else 'NO'} ({off:+.1%})"
    if label.startswith("tp="):
        return "about 1/4 (norms and routers whole on each tp rank)"
    return "" if LAYOUTS[label] is None else "(replicated: 1.0)"


def print_bytes(one: dict[str, int], train: list[dict[str, Any]]) -> None:
    total_one = sum(one.values())
    print(f"\n1. Training state per rank after one step: local shards of params + grads + AdamW state (exact "
          f"bytes), the largest of {WORLD} ranks")
    print(f"  {'layout':22s} {'params':>9s} {'grads':>9s} {'AdamW':>9s} {'total':>9s}  {'/ 1 process':>11s}  goal")
    for label, layout in LAYOUTS.items():
        rows = [one] if layout is None else [r[layout]["bytes"] for r in train]
        worst = max(rows, key=lambda b: sum(b.values()))
        total = sum(worst.values())
        cells = " ".join(f"{worst[k] / MB:7.1f}MB" for k in ("params", "grads", "optim"))
        if layout is not None:
            record(f"training state, largest rank / 1 process: {label}", [total / total_one], goal=goal_of(label))
        print(f"  {label:22s} {cells} {total / MB:7.1f}MB  {total / total_one:11.3f}  "
              f"{goal_text(label, total / total_one)}")
        spread = sorted(sum(b.values()) / MB for b in rows)
        if spread[0] != spread[-1]:
            print(f"  {'':22s} ranks hold {spread[0]:.2f} .. {spread[-1]:.2f} MB")


def print_load(teacher: dict[str, int], one_load: dict[str, int], loads: dict[str, list[dict[str, int]]]) -> None:
    total, largest = teacher["total"], teacher["largest"]
    goal = 1.1 * (total / WORLD + largest)
    print(f"\n2. Loading the teacher: {total / MB:.1f} MB in float32 ({teacher['tensors']} tensors, largest "
          f"{largest / MB:.1f} MB); goal per rank: (teacher/4 + largest) + 10% = {goal / MB:.1f} MB")
    print("  increase over the RSS just before the load (torch and the loading code imported, process group and "
          "meshes made);\n  private / file-mapped: RssAnon / RssFile, sampled after every slice read")
    print(f"  {'':36s} {'peak RSS':>10s} {'private':>10s} {'file-mapped':>11s} {'shards held':>11s}  goal met by")
    inc = kb_to_mb(one_load["peak_kb"] - one_load["base_kb"])
    print(f"  {'whole, 1 process (load)':36s} {inc:+7.1f} MB {'':>10s} {'':>11s} {total / MB:8.1f} MB  "
          f"({inc * MB / total:.2f}x the teacher; baseline {kb_to_mb(one_load['base_kb']):.0f} MB)")
    for label, ranks in loads.items():
        incs = [kb_to_mb(r["peak_kb"] - r["base_kb"]) for r in ranks]
        anon = max(kb_to_mb(r["anon_kb"]) for r in ranks)
        file = max(kb_to_mb(r["file_kb"]) for r in ranks)
        held = max(r["held"] for r in ranks) / MB
        record(f"teacher load, peak RSS increase, largest rank: {label}", [max(incs)], unit="MB",
               goal=f"<= {goal / MB:.1f}")
        verdict = (f"peak RSS: {'yes' if max(incs) * MB <= goal else 'NO'}, "
                   f"private: {'yes' if anon * MB <= goal else 'NO'}")
        print(f"  {label + ', 4 ranks (load_sharded)':36s} {max(incs):+7.1f} MB {anon:+7.1f} MB {file:+8.1f} MB "
              f"{held:8.1f} MB  {verdict}")
        print(f"  {'':36s} peak RSS per rank: {', '.join(f'{x:+.0f}' for x in incs)} MB "
              f"(baseline {kb_to_mb(ranks[0]['base_kb']):.0f} MB)")
    print("  note: each rank reads its regions with pread straight into its shards (distill/safetensors_read.py); "
          "a memory\n  map would count every page of the file a rank touches in its RSS until the file is closed.")


def print_times(train: list[dict[str, Any]], steps: int, warmup: int) -> None:
    from distill.bench import median_ratio
    from distill.bench.parallel_worker import GLOBAL_BATCH, SEQ

    cores = os.cpu_count() or 1
    print(f"\n3. Step time (fwd + bwd + clip + AdamW), global batch {GLOBAL_BATCH}x{SEQ} tokens, median of {steps} "
          f"steps after {warmup} warm-up, 1 thread per process;\n  each 4-rank step follows a one-process step "
          "(rank 0 alone, the others idle), ratios: median over those pairs")
    rows, one_wall, one_cpu = [], [], []
    for label, layout in TIMED.items():
        per_rank = [r[layout]["times"] for r in train]  # [rank][step] = [wall, cpu, (one wall, one cpu)]
        wall = [max(r[s][0] for r in per_rank) for s in range(steps)]
        cpu = [sum(r[s][1] for r in per_rank) for s in range(steps)]
        ow, oc = [t[2] for t in per_rank[0]], [t[3] for t in per_rank[0]]
        one_wall += ow
        one_cpu += oc
        record(f"step wall, 4 ranks / 1 process (1 thread): {label}", ratios(wall, ow), unit="x")
        record(f"step CPU summed over ranks, 4 ranks / 1 process: {label}", ratios(cpu, oc), unit="x")
        rows.append(f"  {label + ', 4 ranks':28s} {1e3 * statistics.median(wall):7.1f} ms/step   CPU "
                    f"{1e3 * statistics.median(cpu):7.1f} ms/step (sum over ranks)   wall {median_ratio(wall, ow):.2f}x, "
                    f"CPU {median_ratio(cpu, oc):.2f}x one process")
    print(f"  {'1 process':28s} {1e3 * statistics.median(one_wall):7.1f} ms/step   CPU "
          f"{1e3 * statistics.median(one_cpu):7.1f} ms/step")
    print("\n".join(rows))
    sharing = f"oversubscribed {WORLD / cores:.1f}x" if cores < WORLD else "one core each"
    print(f"  note: {cores} cores for {WORLD} ranks ({sharing}): with no parallel overhead the 4-rank wall time "
          f"would be {1 / min(WORLD, cores):.2f}x one process\n  here ({1 / WORLD:.2f}x on {WORLD} devices). Wall "
          "times are noisy on a shared machine. The CPU time summed over the ranks\n  against one process is the "
          "work the layout adds (collectives, gathers, regrouping, smaller matmuls): 1.00x would be free.")


def print_scale(label: str, ranks: list[dict[str, Any]], steps: int) -> None:
    per_rank = [r["times"] for r in ranks]  # [rank][step] = [wall, cpu, (one wall, one cpu) per thread count]
    wall = [max(r[s][0] for r in per_rank) for s in range(steps)]
    cpu = [sum(r[s][1] for r in per_rank) for s in range(steps)]
    print(f"  {label + f', {SCALE_WORLD} processes':48s} {1e3 * statistics.median(wall):7.1f} ms/step   CPU "
          f"{1e3 * statistics.median(cpu):7.1f} ms/step (sum over ranks)")
    for i, threads in enumerate(SCALE_THREADS):
        ow, oc = [t[2 + 2 * i] for t in per_rank[0]], [t[3 + 2 * i] for t in per_rank[0]]
        thr, work = ratios(ow, wall), ratios(cpu, oc)
        device = threads == 1  # one process of one thread: one device, as each rank is
        record(f"{label} on {SCALE_WORLD} processes / 1 process ({threads} thread{'s' * (threads > 1)}): throughput",
               thr, unit="x", goal=">= 1.6x" if device else None, better="higher")
        if device:
            record(f"{label} on {SCALE_WORLD} processes / 1 process (1 thread): CPU time summed over ranks", work,
                   unit="x")
        name = f"1 process, {threads} thread{'s' * (threads > 1)}"
        print(f"    {name:46s} {1e3 * statistics.median(ow):7.1f} ms/step   "
              f"CPU {1e3 * statistics.median(oc):7.1f} ms/step   throughput {fmt(thr, 2)}x"
              + (f" (goal >= 1.6x), CPU summed over ranks {fmt(work, 2)}x" if device else ""))


def print_scale_header() -> None:
    print(f"\n4. Expert-parallel throughput: {SCALE_WORLD} processes of 1 thread ({SCALE_WORLD} devices) vs 1 process "
          "of 1 thread (1 device),\n  same global batch, step by step in turn; throughput = one-process wall / layout "
          f"wall (the slower rank).\n  Also vs 1 process of {SCALE_WORLD} threads (the same cores as the ranks: "
          "intra-op threads instead of expert parallelism).")


def print_scale_footer() -> None:
    print("  CPU summed over ranks / one process: the work the layout adds (FSDP's gathers and reductions of the "
          "dense\n  parameters, the all-to-alls, smaller matmuls, gloo's own threads); 1.00x would be free. "
          f"1-min load average\n  {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: above the core count, wall "
          "times mostly measure waiting for a descheduled thread.")


def main(steps: int | None = None, warmup: int = 2) -> None:
    from distill.bench.parallel_worker import bench_config, teacher_config

    steps = reps(8) if steps is None else steps
    cfg, tcfg = bench_config(), teacher_config()
    print(f"gloo on CPU, {WORLD} ranks = {WORLD} processes of one thread each. Model: d={cfg.d_model} "
          f"layers={cfg.n_layers} experts={cfg.num_experts} top-{cfg.moe.top_k} dropless vocab={cfg.vocab_size}; "
          f"teacher: d={tcfg.d_model} layers={tcfg.n_layers} experts={tcfg.num_experts}", flush=True)
    layouts = [layout for layout in LAYOUTS.values() if layout is not None]
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        teacher_dir = Path(tmp) / "teacher"
        teacher = export_teacher(teacher_dir)
        one = run("one", [str(teacher_dir)], 1)
        train = run("train", [";".join(layouts), ";".join(TIMED.values()), str(steps), str(warmup)], WORLD)["ranks"]
        print_bytes(one["bytes"], train)
        loads = {label: run("load", [str(teacher_dir), layout], WORLD)["ranks"]
                 for label, layout in LOAD_LAYOUTS.items()}
        print_load(teacher, one["load"], loads)
    print_times(train, steps, warmup)
    print_scale_header()
    for label, layout in SCALE.items():
        threads = ",".join(map(str, SCALE_THREADS))
        print_scale(label, run("scale", [layout, str(steps), str(warmup), threads], SCALE_WORLD)["ranks"], steps)
    print_scale_footer()


if __name__ == "__main__":
    main()
