"""Expert parallelism on CPU (gloo): training-step time of ep=2 on 2 processes against 1 process, and the
share of the ep=2 step spent in all-to-all.

Same global batch and model in every run; a training step is forward, backward, gradient reduction,
clipping by the full model's norm and an AdamW step (what ExpertParallelStrategy does under Lightning,
without Lightning's own overhead). Each process stands for one device and uses one thread (one core):

    one   1 process:   every expert, the whole global batch
    dp    2 processes: ep=1, experts replicated (data parallel), half the batch each
    ep    2 processes: ep=2, each rank holds half of every layer's experts, tokens move by all-to-all

The runs alternate over `rounds` so that a change in the machine's load hits all of them alike. On CPU
this measures the cost of expert parallelism (all-to-all, regrouping, synchronisation), not the memory
it saves (each rank holds half of the expert parameters and their optimizer state). The all-to-all time
includes waiting for the other rank to arrive at the collective.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from distill.models import GPT, ModelConfig, lm_loss
from distill.moe import MoEConfig

D_MODEL, LAYERS, EXPERTS, SEQ, GLOBAL_BATCH, VOCAB = 256, 4, [8, 8], 128, 8, 4096
MODES = {"one": (1, 1), "dp": (2, 1), "ep": (2, 2)}  # mode -> (processes, ep_size)


def model_config() -> ModelConfig:
    return ModelConfig(
        name="bench",
        vocab_size=VOCAB,
        d_model=D_MODEL,
        n_layers=LAYERS,
        n_heads=4,
        max_seq_len=SEQ,
        num_experts=EXPERTS,
        moe=MoEConfig(top_k=1, dropless=True),
    ).validate()


def worker(mode: str, steps: int, warmup: int) -> None:
    """One rank: time `steps` training steps after `warmup`; rank 0 prints a JSON line."""
    from torch.nn.parallel import DistributedDataParallel

    from distill.parallel import (
        CommTimer,
        ExpertGroups,
        clip_grad_norm_expert_parallel,
        ddp_ignore_experts,
        reduce_expert_grads,
        shard_experts,
    )

    world, ep = MODES[mode]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(model_config())
    ids = torch.randint(VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    timer = CommTimer(enabled=True)
    shards, rank, net = [], 0, model
    if world > 1:
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
        rank = dist.get_rank()
        shards = shard_experts(model, ExpertGroups(ep, rank, world, timedelta(seconds=120)), timer)
        ddp_ignore_experts(model, shards)
        net = DistributedDataParallel(model)
    batch = ids.split(GLOBAL_BATCH // world)[rank]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        out = net(batch[:, :-1])
        (lm_loss(out.logits, batch[:, 1:]) + 0.01 * out.aux_loss).backward()
        reduce_expert_grads(shards, world)
        clip_grad_norm_expert_parallel(model.parameters(), 1.0, shards, world)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        if i == warmup:
            timer.reset()
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times = times[warmup:]
    if rank == 0:
        print(
            json.dumps(
                {"mode": mode, "times": times, "a2a_s": timer.seconds, "a2a_calls": timer.calls / steps}
            ),
            flush=True,
        )
    if world > 1:
        dist.destroy_process_group()


def run(mode: str, steps: int, warmup: int) -> dict[str, float]:
    from distill.parallel.launch import run_ranks

    world = MODES[mode][0]
    argv = [sys.executable, "-m", "distill.bench.parallel", "--worker", mode, str(steps), str(warmup)]
    results = run_ranks(argv, world, timeout=600, threads=1)
    for code, out in results:
        if code != 0:
            raise RuntimeError(f"bench worker {mode} exited {code}:\n{out[-3000:]}")
    line = next(x for x in results[0][1].splitlines() if x.startswith("{"))
    return json.loads(line)


def main(steps: int = 10, warmup: int = 2, rounds: int = 2) -> None:
    cfg = model_config()
    print(
        f"GPT d={D_MODEL} layers={LAYERS} experts={EXPERTS} top-1 dropless, global batch {GLOBAL_BATCH}x{SEQ} "
        f"tokens, gloo on CPU, 1 thread per process; median of {rounds}x{steps} steps, runs alternated"
    )
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    a2a_s, a2a_calls = 0.0, 0.0
    for _ in range(rounds):
        for mode in MODES:
            r = run(mode, steps, warmup)
            times[mode] += r["times"]
            if mode == "ep":
                a2a_s, a2a_calls = a2a_s + r["a2a_s"], r["a2a_calls"]
    one, dp, ep = (statistics.median(times[m]) for m in MODES)
    share = a2a_s / sum(times["ep"])
    print(f"  1 process            {1e3 * one:8.1f} ms/step")
    print(f"  2 processes, ep=1    {1e3 * dp:8.1f} ms/step  ({dp / one:.2f}x one process)")
    print(
        f"  2 processes, ep=2    {1e3 * ep:8.1f} ms/step  ({ep / one:.2f}x one process, {ep / dp:.2f}x ep=1)"
    )
    print(
        f"  all-to-all share of the ep=2 step: {100 * share:.1f}% "
        f"({1e3 * a2a_s / len(times['ep']):.1f} ms/step in {a2a_calls:.0f} calls, forward+backward)"
    )
    experts = sum(p.numel() for layer in GPT(cfg).moe_layers for p in layer.experts.parameters())
    print(f"  expert parameters per rank: {experts:,} at ep=1, {experts // 2:,} at ep=2")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
