"""One rank of the mesh-parallel gradient check (started by tests/test_parallel.py, one process per rank).

    python tests/parallel_worker.py OUT_DIR LAYOUT[@S1+S2][;LAYOUT...] SCENARIO[,SCENARIO...]   (RANK, WORLD_SIZE, MASTER_* in env)

LAYOUT is e.g. ``ep=2,dp_shard=2`` (the `parallel` config node). Every rank builds the same model and
the same global batch. Reference: one process, the whole model, the global batch as W micro-batches with
the loss averaged over them (what data parallelism with replicated experts computes). Parallel: the model
laid out by `parallelize` on the layout's mesh, this rank's micro-batch. Compared: the loss, every
gradient as a full tensor, the norm of the full model and the clipped gradients, every weight after one
AdamW step. Writes the differences to OUT_DIR/{LAYOUT}-{SCENARIO}-rank{R}.json; the test asserts.
"""

from __future__ import annotations

import copy
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from distill.losses import lm_loss
from distill.models import GPT, ModelConfig
from distill.moe import MoEConfig
from distill.parallel.config import ParallelConfig
from distill.parallel.dispatch import CommTimer
from distill.parallel.grads import all_reduce_balance_counts, balance_count_buffers, clip_grad_norm_
from distill.parallel.hierarchical import Traffic
from distill.parallel.mesh import ParallelMesh
from distill.parallel.parallelize import parallelize
from distill.parallel.tensor import tp_sharded

SCENARIOS = {
    # top-1 residual PR-MoE, dropless; a layer with fewer experts (1) than ep
    "dropless": dict(num_experts=[4, 2, 1], moe=MoEConfig(top_k=1, dropless=True, residual=True)),
    # top-2 with capacity 1.0: tokens are dropped, per micro-batch, exactly as in the reference
    "capacity": dict(num_experts=[4, 8], moe=MoEConfig(top_k=2, capacity_factor=1.0, min_capacity=2)),
    # every token chooses expert 0 (a bias on the choice): the ranks holding other experts receive
    # nothing and must still take part in every all-to-all, forward and backward
    "skewed": dict(num_experts=[4, 4], moe=MoEConfig(top_k=1, dropless=True, aux_free_bias=True), skew=True),
}
BATCH, SEQ, VOCAB = 2, 16, 64
AUX_COEF, Z_COEF = 0.01, 0.001


def objective(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ce) of the LM objective as LMModule trains it."""
    out = model(ids[:, :-1])
    ce = lm_loss(out.logits, ids[:, 1:])
    return ce + AUX_COEF * out.aux_loss + Z_COEF * out.z_loss, ce


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (full(a).float() - b.float()).abs().max().item() if b.numel() else 0.0


def parse_value(v: str) -> int | bool | str:
    return int(v) if v.lstrip("-").isdigit() else {"true": True, "false": False}.get(v, v)


def parse_layout(text: str) -> ParallelConfig:
    return ParallelConfig(**{k: parse_value(v) for k, v in (kv.split("=") for kv in text.split(","))})


def run(out_dir: Path, layout_text: str, scenario: str, rank: int, world: int) -> None:
    spec = SCENARIOS[scenario]
    layout = parse_layout(layout_text).resolve(world)
    n_moe = len(spec["num_experts"])
    cfg = ModelConfig(name="t", vocab_size=VOCAB, d_model=32, n_layers=2 * n_moe, n_heads=4, max_seq_len=SEQ,
                      num_experts=spec["num_experts"], moe=spec["moe"])
    torch.manual_seed(0)
    ref = GPT(cfg)
    if spec.get("skew"):
        for layer in ref.moe_layers:
            layer.router.balance_bias[0] = 10.0
    model = copy.deepcopy(ref)
    ids = torch.randint(VOCAB, (world * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    micro = ids.split(BATCH * layout.tp)  # one micro-batch per data-parallel rank (a tensor-parallel group shares one)

    # reference: one process, all experts, the global batch as W micro-batches
    ref_terms = [objective(ref, m) for m in micro]
    ref_loss = torch.stack([t[0] for t in ref_terms]).mean()
    ref_loss.backward()
    ref_counts = [c.tolist() for c in balance_count_buffers(ref)]  # before the next forward adds to them
    with torch.no_grad():
        full_ce = objective(ref, ids)[1]  # one forward over the whole global batch

    mesh = ParallelMesh(layout)
    timer = CommTimer(enabled=True)  # counts the all-to-alls the dispatchers run, recomputations included
    traffic = Traffic(1)  # every other rank counted as remote: the bytes this rank's all-to-alls send away
    parallelize(model, mesh, timer=timer, traffic=traffic)
    positions = []  # positions of the residual stream a rank holds (its local tensor), at block 0's first norm
    model.blocks[0].ln_1.register_forward_pre_hook(
        lambda mod, args: positions.append(getattr(args[0], "_local_tensor", args[0]).shape[1]))
    received = []  # rows each rank's experts compute, per MoE layer
    for layer in model.moe_layers:
        layer.experts.register_forward_pre_hook(lambda mod, args: received.append(int(args[1].sum())))
    loss, ce = objective(model, micro[rank // layout.tp])
    loss.backward()
    losses = torch.stack([loss.detach(), ce.detach()])
    dist.all_reduce(losses)
    losses /= world
    all_reduce_balance_counts(model, copies=layout.tp)
    ref_params = dict(ref.named_parameters())
    params = dict(model.named_parameters())
    assert params.keys() == ref_params.keys(), sorted(set(params) ^ set(ref_params))
    grad_diff = {name: max_diff(p.grad, ref_params[name].grad) for name, p in params.items()}
    counts = [c.tolist() for c in balance_count_buffers(model)]  # summed over the ranks = the reference's

    # clipping by the norm of the full model
    norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    norm = clip_grad_norm_(model.parameters(), 0.05)
    clipped_diff = max(max_diff(p.grad, ref_params[n].grad) for n, p in params.items())

    # one AdamW step on shards only. (A large eps keeps the update smooth in the gradient: with eps=1e-8,
    # g / (|g| + eps) turns a 1e-9 gradient difference near g = 0 into a full +-lr step.)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3)
    opt_ref.step()
    opt.step()
    weight_diff = max(max_diff(p, ref_params[n].detach()) for n, p in params.items())
    local = sum(p.to_local().numel() for p in params.values())
    tp_whole = sorted(n for n, p in params.items() if not tp_sharded(p))  # held whole by every tp rank
    total = sum(p.numel() for p in ref.parameters())
    result = {"rank": rank, "layout": layout.describe(), "received": received, "loss": losses[0].item(),
              "loss_ref": ref_loss.item(), "ce": losses[1].item(), "ce_full_batch": full_ce.item(),
              "grad_diff": grad_diff, "norm": norm.item(), "norm_ref": norm_ref.item(),
              "clipped_grad_diff": clipped_diff, "weight_diff": weight_diff, "local_params": local,
              "total_params": total, "counts": counts, "ref_counts": ref_counts,
              "all_to_alls": timer.calls, "a2a_bytes": traffic.bytes, "positions": positions, "tp_other": traffic.other,
              "tp_whole": tp_whole, "tp_whole_numel": sum(ref_params[n].numel() for n in tp_whole),
              "experts": {n: [p.to_local().shape[0], p.shape[0]] for n, p in params.items() if "experts." in n}}
    name = layout_text.replace(",", "_").replace("=", "")
    (out_dir / f"{name}-{scenario}-rank{rank}.json").write_text(json.dumps(result))


def main(out_dir: Path, layouts: list[str], scenarios: list[str]) -> None:
    torch.set_num_threads(1)  # several ranks share few cores
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    for item in layouts:
        layout, _, only = item.partition("@")  # LAYOUT@s1+s2: only those scenarios
        for scenario in only.split("+") if only else scenarios:
            run(out_dir, layout, scenario, dist.get_rank(), dist.get_world_size())
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(";"), sys.argv[3].split(","))
