"""One rank of the layout planner's check against measured shards (started by tests/test_plan.py, one process
per rank).

    python tests/plan_worker.py OUT_DIR LAYOUT[;LAYOUT...]   (RANK, WORLD_SIZE, MASTER_* in env)

LAYOUT is e.g. ``ep=2,dp_shard=2`` (the `parallel` config node). For each layout every rank builds the same
model (`plan_test_config`), lays it out with `parallelize` and measures what it holds: the bytes of its local
parameter shards, of their gradients after one forward and backward, and of the AdamW state after one step
(the moments and the step counters apart); and the all-to-all traffic of the forward's dispatches
(`distill.parallel.hierarchical.Traffic` with nodes of ``parallel.ep_intra`` ranks, 1 when null: then every
other rank is another node; under tensor parallelism also the bytes of the experts' collectives over ``tp``). Routing is forced uniform (token t's choice j goes to expert (t·k + j) mod E), the
planner's assumption. Writes OUT_DIR/{LAYOUT}-rank{R}.json; the test compares them with the planner.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distill.losses import lm_loss
from distill.models import GPT, ModelConfig
from distill.moe import MoEConfig
from distill.parallel.config import ParallelConfig

BATCH, SEQ = 2, 16  # the micro-batch of every rank


def plan_test_config() -> ModelConfig:
    """A PR-MoE with every kind of parameter the layout rules name: a dense MLP, MoE layers with a residual
    MLP, a gated shared expert and SwiGLU experts, an untied head; 8 and 2 experts (the second needs a
    sub-group at ep=4); top-2; shapes that give uneven FSDP shards (coef [2, d], a 2-expert router)."""
    return ModelConfig(name="plan-test", vocab_size=96, d_model=32, n_layers=4, n_heads=4, max_seq_len=SEQ,
                       num_experts=[8, 2], tie_embeddings=False,
                       moe=MoEConfig(top_k=2, residual=True, num_shared_experts=1, shared_gate=True,
                                     activation="swiglu", d_ff=48, capacity_factor=1.0)).validate()


def uniform_routing(model: nn.Module) -> None:
    """Every MoE layer's router picks expert (t·k + j) mod E for choice j of token t: each expert gets k·T/E rows."""
    for layer in model.moe_layers:
        def hook(router: nn.Module, args: Any, routing: Any, E: int = layer.num_experts, k: int = layer.top_k) -> Any:
            idx = torch.arange(routing.expert_idx.numel(), device=routing.expert_idx.device).view(-1, k) % E
            return routing._replace(expert_idx=idx, choice_counts=torch.bincount(idx.flatten(), minlength=E))

        layer.router.register_forward_hook(hook)


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def parse_layout(text: str) -> ParallelConfig:
    return ParallelConfig(**{k: int(v) if v.lstrip("-").isdigit() else v
                             for k, v in (kv.split("=") for kv in text.split(","))})


def run(out_dir: Path, text: str, rank: int, world: int) -> None:
    from distill.parallel.hierarchical import Traffic
    from distill.parallel.mesh import ParallelMesh
    from distill.parallel.parallelize import parallelize

    layout = parse_layout(text).resolve(world)
    cfg = plan_test_config()
    torch.manual_seed(0)
    model = GPT(cfg)
    uniform_routing(model)
    traffic = Traffic(layout.ep_intra or 1)
    parallelize(model, ParallelMesh(layout), traffic=traffic)
    params = list(model.parameters())
    ids = torch.randint(cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    out = model(ids[:, :-1])
    (lm_loss(out.logits, ids[:, 1:]) + 0.01 * out.aux_loss).backward()
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    moments = steps = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key == "step":
                steps += local_bytes(value)
            elif torch.is_tensor(value):
                moments += local_bytes(value)
    result = {"rank": rank, "layout": layout.describe(), "params": sum(local_bytes(p) for p in params),
              "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None), "moments": moments,
              "steps": steps, "step_tensors": sum("step" in s for s in opt.state.values()), "tensors": len(params),
              "traffic_bytes": traffic.bytes, "traffic_messages": traffic.messages,
              "traffic_other": dict(getattr(traffic, "other", {}))}  # tensor parallelism's collectives, by kind
    (out_dir / f"{text.replace(',', '_').replace('=', '')}-rank{rank}.json").write_text(json.dumps(result))


def main(out_dir: Path, layouts: list[str]) -> None:
    torch.set_num_threads(1)  # several ranks share few cores
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    for text in layouts:
        run(out_dir, text, dist.get_rank(), dist.get_world_size())
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(";"))
