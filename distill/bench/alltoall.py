"""The expert all-to-all on 4 gloo ranks: flat vs hierarchical, and with vs without duplicate token dropping.

1. Flat vs hierarchical: what crosses the node boundary per rank per training step.

4 gloo ranks, `ep=4`, laid out as 2 simulated nodes of 2 ranks (`parallel.ep_intra=2` for the hierarchical
run). The same model, batch and routing in both runs: one forward + backward of a PR-MoE with 8 experts per
MoE layer, top-2, dropless. Every exchange of every MoE layer's forward dispatch counts (the combine and the backward
exchanges mirror it): the messages a rank sends to ranks of the other node and their bytes (`distill.parallel.hierarchical.Traffic`). The
hierarchical exchange sends, across the boundary, one message per remote node instead of one per remote
rank; the bytes that must cross do not change. Also printed: the step time of each (gloo on 2 cores: a
rough figure; on a real cluster the saving is in latency per message across nodes).

2. Tensor-expert-data (`tp=2 x ep=2`): the bytes each rank's all-to-alls send to other ranks per step with
and without duplicate token dropping (`parallel.drop_duplicate_tokens`; goal: divided by tp), and the
tensor-parallel collectives the experts add instead (all-reduce without dropping; all-gather and
reduce-scatter with it).

Recorded (`distill.bench.record`): the message and byte ratios (exact counts: one sample each) and each
layout's step time, rank 0's, one sample per timed step (`--reps N`: N steps, default 4).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

# name -> (the `parallel` node, ranks per simulated node counted by `Traffic`)
LAYOUTS = {
    "flat": (dict(ep=4, dp_shard=1), 2),
    "hierarchical": (dict(ep=4, dp_shard=1, ep_intra=2), 2),
    "tp=2 x ep=2, dropping": (dict(tp=2, ep=2, dp_shard=1, drop_duplicate_tokens=True), 1),
    "tp=2 x ep=2, no dropping": (dict(tp=2, ep=2, dp_shard=1, drop_duplicate_tokens=False), 1),
}


def worker(steps: int) -> None:
    import torch.distributed as dist

    from distill.losses import lm_loss
    from distill.models import GPT, ModelConfig
    from distill.moe import MoEConfig
    from distill.parallel.config import ParallelConfig
    from distill.parallel.hierarchical import Traffic
    from distill.parallel.mesh import ParallelMesh
    from distill.parallel.parallelize import parallelize

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(name="a2a", vocab_size=1024, d_model=128, n_layers=4, n_heads=4, max_seq_len=128,
                      num_experts=[8, 8], moe=MoEConfig(top_k=2, dropless=True, residual=True)).validate()
    ids = torch.randint(1024, (world * 4, 129), generator=torch.Generator().manual_seed(rank))
    results = {}
    for name, (node, per_node) in LAYOUTS.items():
        torch.manual_seed(0)
        model = GPT(cfg)
        traffic = Traffic(ranks_per_node=per_node)
        layout = ParallelConfig(**node).resolve(world)
        parallelize(model, ParallelMesh(layout), traffic=traffic)
        mine = slice(rank // layout.tp * 4, (rank // layout.tp + 1) * 4)  # a tp group shares its rows
        times = []
        for step in range(steps + 1):
            if step == 1:
                traffic.messages = traffic.bytes = 0  # count the measured steps only
                traffic.other = {}
            dist.barrier()
            t0 = time.perf_counter()
            out = model(ids[mine, :-1])
            lm_loss(out.logits, ids[mine, 1:]).backward()
            times.append(time.perf_counter() - t0)
        kinds = sorted(traffic.other)
        counts = torch.tensor([traffic.messages, traffic.bytes, *(traffic.other[k] for k in kinds)]) / steps
        dist.all_reduce(counts)
        counts /= world
        results[name] = {"messages": counts[0].item(), "bytes": counts[1].item(), "ms": 1000 * statistics.median(times[1:]),
                         "times_ms": [1000 * t for t in times[1:]],
                         **{k: counts[2 + i].item() for i, k in enumerate(kinds)}}
    if rank == 0:
        print(json.dumps(results), flush=True)
    dist.destroy_process_group()


def main(steps: int | None = None) -> None:
    from distill.bench import fmt, record, reps
    from distill.parallel.launch import run_ranks

    steps = reps(4) if steps is None else steps
    results = run_ranks([sys.executable, "-m", "distill.bench.alltoall", "--worker", str(steps)], 4, timeout=600)
    bad = [(code, out[-2000:]) for code, out in results if code != 0]
    if bad:
        raise RuntimeError(f"all-to-all bench failed: {bad[0][1]}")
    res = json.loads([ln for ln in results[0][1].splitlines() if ln.startswith("{")][-1])
    print("ep=4 on 4 gloo ranks as 2 simulated nodes x 2 ranks; 2 MoE layers of 8 experts, top-2, 512 tokens per rank;")
    print("per rank per training step, crossing the node boundary, in the forward dispatch of each MoE layer (the combine")
    print("and the two backward exchanges move the same rows back: 4x these per step):")
    print(f"  {'all-to-all':14s} {'messages':>9s} {'bytes':>12s} {'step ms':>22s}")
    flat, hier = res["flat"], res["hierarchical"]
    for name in ("flat", "hierarchical"):
        r = res[name]
        record(f"{name} step ms (ep=4, 4 gloo ranks)", r["times_ms"], unit="ms")
        print(f"  {name:14s} {r['messages']:9.1f} {r['bytes']:12,.0f} {fmt(r['times_ms'], 1):>22s}")
    record("hierarchical / flat: cross-node messages", [hier["messages"] / flat["messages"]], goal="<= 0.50")
    record("hierarchical / flat: cross-node bytes", [hier["bytes"] / flat["bytes"]], goal="1.00 +- 0.01")
    print(f"  hierarchical / flat: messages {hier['messages'] / flat['messages']:.2f}x (goal: 1/ranks per node = 0.50), "
          f"bytes {hier['bytes'] / flat['bytes']:.2f}x (the same rows must cross)")
    print()
    print("tp=2 x ep=2 on the same 4 ranks (a tp pair shares 4 sequences); per rank per training step, forward dispatches:")
    print(f"  {'':26s} {'all-to-all bytes':>17s} {'tp all-reduce':>14s} {'tp all-gather':>14s} {'tp reduce-scat.':>16s} "
          f"{'step ms':>22s}")
    drop, keep = res["tp=2 x ep=2, dropping"], res["tp=2 x ep=2, no dropping"]
    for name, r in (("no dropping", keep), ("duplicate tokens dropped", drop)):
        print(f"  {name:26s} {r['bytes']:17,.0f} {r.get('tp_all_reduce', 0):14,.0f} {r.get('tp_all_gather', 0):14,.0f} "
              f"{r.get('tp_reduce_scatter', 0):16,.0f} {fmt(r['times_ms'], 1):>22s}")
        record(f"tp=2 x ep=2, {name}: step ms", r["times_ms"], unit="ms")
    record("tp=2 x ep=2, dropping / no dropping: all-to-all bytes", [drop["bytes"] / keep["bytes"]], goal="<= 0.50")
    print(f"  dropping / no dropping, all-to-all bytes: {drop['bytes'] / keep['bytes']:.2f}x (goal: 1/tp = 0.50)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]))
    else:
        main()
