"""Processes of the `parallel` benchmark (started by distill/bench/parallel.py; one process per rank).

    python -m distill.bench.parallel_worker one   TEACHER_DIR               (1 process, no process group)
    python -m distill.bench.parallel_worker load  TEACHER_DIR LAYOUT         (RANK, WORLD_SIZE, MASTER_* in env)
    python -m distill.bench.parallel_worker train LAYOUT[;..] TIMED[;..] STEPS WARMUP
    python -m distill.bench.parallel_worker scale LAYOUT STEPS WARMUP ONE_THREADS[,..]

LAYOUT is e.g. ``ep=2,dp_shard=2`` (the `parallel` config node). Each mode prints one JSON line (rank 0 for
the multi-process modes, with every rank's numbers gathered):

- one:   peak resident memory of loading the teacher whole (`ExportTeacher.load`), and the training state's
         bytes of the bench model on one process.
- load:  per rank, the peak resident memory of `ExportTeacher.load_sharded` on the layout's mesh.
- train: per layout, a fresh bench model laid out by `parallelize`: the bytes of the local shards of its
         parameters, gradients and AdamW state after one step; for the TIMED layouts, step times too, each
         step after one of the whole model on the global batch on rank 0 (one process, timed in turn, so
         that a change in the machine's load hits both alike; the other ranks wait in a barrier, idle).
- scale: step times of one layout on WORLD ranks of one thread each, each step after one of the whole model
         on the global batch on rank 0 per entry of ONE_THREADS (its intra-op threads; WORLD for a fair
         throughput comparison: the same cores either way), the other ranks waiting in a barrier, idle.

Byte counts are exact (numel x element size of the local shards). Resident memory comes from
/proc/self/status: the baseline is VmRSS just before the load (torch and the loading code imported, process
group and meshes created), the peak is VmHWM after it, reset first by writing 5 to /proc/self/clear_refs.
The sharded load also samples private (RssAnon) and file-mapped (RssFile) memory after every slice read.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distill.config import OptimConfig
from distill.losses import lm_loss
from distill.models import GPT, ModelConfig
from distill.moe import MoEConfig
from distill.parallel.config import ParallelConfig
from distill.train.optim import build_optimizer

SEQ, GLOBAL_BATCH, VOCAB = 128, 8, 4096
AUX_COEF, CLIP = 0.01, 1.0


def bench_config() -> ModelConfig:
    """The training model: 2 MoE blocks of 16 experts (top-2, dropless), 19.9M parameters."""
    return ModelConfig(name="bench", vocab_size=VOCAB, d_model=256, n_layers=4, n_heads=4, max_seq_len=SEQ,
                       num_experts=[16, 16], moe=MoEConfig(top_k=2, dropless=True)).validate()


def teacher_config() -> ModelConfig:
    """The teacher to load: 3 MoE blocks of 16 experts at d_model 512 (115M parameters, 0.46 GB in float32)."""
    return ModelConfig(name="bench-teacher", vocab_size=VOCAB, d_model=512, n_layers=6, n_heads=8,
                       max_seq_len=SEQ, num_experts=[16, 16, 16], moe=MoEConfig(top_k=2, dropless=True)).validate()


def parse_layout(text: str) -> ParallelConfig:
    """`key=value,...` of the `parallel` node: integers, or true/false."""
    return ParallelConfig(**{k: v == "true" if v in ("true", "false") else int(v)
                             for k, v in (kv.split("=") for kv in text.split(","))})


# ---------------------------------------------------------------------------------------------- memory


def status_kb(key: str) -> int:
    text = open("/proc/self/status").read()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else -1


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of the parameters, gradients and optimizer state (local shards only)."""
    params = list(model.parameters())  # tied parameters once
    return {
        "params": sum(local_bytes(p) for p in params),
        "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optim": sum(local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
    }


# ---------------------------------------------------------------------------------------------- training


def global_batch() -> torch.Tensor:
    return torch.randint(VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor, parallel: bool,
               copies: int = 1) -> None:
    """Forward, backward, (balancing counts,) clipping by the full model's norm, AdamW."""
    from distill.parallel.grads import all_reduce_balance_counts, clip_grad_norm_

    out = model(batch[:, :-1])
    (lm_loss(out.logits, batch[:, 1:]) + AUX_COEF * out.aux_loss).backward()
    if parallel:
        all_reduce_balance_counts(model, copies=copies)
        clip_grad_norm_(model.parameters(), CLIP)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """The app's optimizer (`build_optimizer`: torch's fused AdamW on CPU, plain or on a mesh)."""
    return build_optimizer(model, OptimConfig(lr=1e-4), max_steps=1000)[0]


def timed_step(model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor, parallel: bool,
               copies: int = 1) -> list[float]:
    """[wall, CPU time of this process (all its threads)] of one training step."""
    opt.zero_grad(set_to_none=True)
    if parallel:
        dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    train_step(model, opt, batch, parallel, copies)
    return [time.perf_counter() - t0, time.process_time() - c0]


# ---------------------------------------------------------------------------------------------- modes


def one(teacher_dir: str) -> dict[str, Any]:
    import safetensors.torch  # noqa: F401  the loading code first: the baseline includes it

    from teachers.native import ExportTeacher

    source = ExportTeacher(teacher_dir)
    source.architecture()
    base = status_kb("VmRSS")
    reset_peak()
    teacher = source.load(torch.float32)
    load = {"base_kb": base, "peak_kb": status_kb("VmHWM"), "after_kb": status_kb("VmRSS")}
    del teacher

    torch.manual_seed(0)
    model = GPT(bench_config())
    opt = adamw(model)
    train_step(model, opt, global_batch(), parallel=False)
    return {"load": load, "bytes": state_bytes(model, opt)}


def load(teacher_dir: str, layout_text: str) -> dict[str, Any]:
    from distill.parallel.load import SafetensorsFiles
    from distill.parallel.mesh import ParallelMesh, layer_group_size
    from teachers.native import ExportTeacher

    world = dist.get_world_size()
    source = ExportTeacher(teacher_dir)
    cfg = source.architecture()
    source.sharded_tensors()  # headers only: imports the loading code (~25 MB, torch._dynamo) before the baseline
    mesh = ParallelMesh(parse_layout(layout_text).resolve(world))
    mesh.dense  # noqa: B018  the meshes first (collective), so that the baseline includes them
    for g in sorted({layer_group_size(e, mesh.layout.ep) for e in cfg.num_experts}):
        mesh.experts(g)
    # private (anonymous) and file-mapped resident memory, sampled after every slice read: the file is
    # memory-mapped, and the pages a rank touches count in its RSS until the file is closed
    sampled = {"RssAnon": 0, "RssFile": 0}
    read = SafetensorsFiles.read

    def sampling_read(self: SafetensorsFiles, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        value = read(self, name, index)
        for key in sampled:
            sampled[key] = max(sampled[key], status_kb(key))
        return value

    SafetensorsFiles.read = sampling_read  # type: ignore[method-assign]
    dist.barrier()
    base = {key: status_kb(key) for key in ("VmRSS", "RssAnon", "RssFile")}
    reset_peak()
    teacher = source.load_sharded(torch.float32, mesh)
    peak, after = status_kb("VmHWM"), status_kb("VmRSS")
    SafetensorsFiles.read = read  # type: ignore[method-assign]
    held = sum(local_bytes(t) for t in teacher.parameters())
    dist.barrier()
    return {"base_kb": base["VmRSS"], "peak_kb": peak, "after_kb": after, "held": held,
            "anon_kb": sampled["RssAnon"] - base["RssAnon"], "file_kb": sampled["RssFile"] - base["RssFile"]}


def train(layouts: list[str], timed: list[str], steps: int, warmup: int) -> dict[str, Any]:
    from distill.parallel.mesh import ParallelMesh
    from distill.parallel.parallelize import parallelize

    world, rank = dist.get_world_size(), dist.get_rank()
    results: dict[str, Any] = {}
    if rank == 0 and timed:  # one process, the whole model and global batch, timed step by step in turn
        torch.manual_seed(0)
        ref = GPT(bench_config())
        ref_opt = adamw(ref)
    for text in layouts:
        torch.manual_seed(0)
        layout = parse_layout(text).resolve(world)
        model = parallelize(GPT(bench_config()), ParallelMesh(layout))
        opt = adamw(model)
        # one micro-batch per data-parallel rank; a tensor-parallel group shares it
        batch = global_batch().split(GLOBAL_BATCH // layout.data_parallel)[rank // layout.tp]
        train_step(model, opt, batch, parallel=True, copies=layout.tp)
        results[text] = {"bytes": state_bytes(model, opt)}
        if text in timed:  # rank 0's one-process step runs while the other ranks wait in the barrier
            times: list[list[float]] = []
            for i in range(warmup + steps):
                one_step = timed_step(ref, ref_opt, global_batch(), parallel=False) if rank == 0 else []
                step = timed_step(model, opt, batch, parallel=True, copies=layout.tp)
                if i >= warmup:
                    times.append(step + one_step)
            results[text]["times"] = times  # per step: [wall, cpu] (+ [one wall, one cpu] on rank 0)
        del model, opt
    return results


def scale(text: str, steps: int, warmup: int, one_threads: list[int]) -> dict[str, Any]:
    from distill.parallel.mesh import ParallelMesh
    from distill.parallel.parallelize import parallelize

    rank = dist.get_rank()
    torch.manual_seed(0)
    ref = GPT(bench_config())
    ref_opt = adamw(ref)
    torch.manual_seed(0)
    layout = parse_layout(text).resolve(dist.get_world_size())
    model = parallelize(GPT(bench_config()), ParallelMesh(layout))
    opt = adamw(model)
    batch = global_batch().split(GLOBAL_BATCH // layout.data_parallel)[rank // layout.tp]
    times: list[list[float]] = []
    for i in range(warmup + steps):
        one_step: list[float] = []
        if rank == 0:  # the others wait in the barrier of their next step
            for threads in one_threads:
                torch.set_num_threads(threads)
                one_step += timed_step(ref, ref_opt, global_batch(), parallel=False)
            torch.set_num_threads(1)
        step = timed_step(model, opt, batch, parallel=True, copies=layout.tp)
        if i >= warmup:
            times.append(step + one_step)
    return {"times": times}  # per step: [wall, cpu] (+ [one wall, one cpu] per ONE_THREADS on rank 0)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)  # one process stands for one device, one core
    mode, args = argv[0], argv[1:]
    if mode == "one":
        print(json.dumps(one(args[0])), flush=True)
        return
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    if mode == "load":
        mine = load(args[0], args[1])
    elif mode == "scale":
        mine = scale(args[0], int(args[1]), int(args[2]), [int(n) for n in args[3].split(",")])
    else:
        mine = train(args[0].split(";"), args[1].split(";"), int(args[2]), int(args[3]))
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() == 0:
        print(json.dumps({"ranks": ranks}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
