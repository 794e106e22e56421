"""One rank of the expert-parallel gradient check (started by tests/test_parallel.py, one process per rank).

    python tests/parallel_worker.py OUT_DIR EP_SIZE SCENARIO[,SCENARIO...]  (RANK, WORLD_SIZE, MASTER_* in env)

Every rank builds the same model and the same global batch. Reference: one process, the whole model,
the global batch as W micro-batches with the loss averaged over them (what data parallelism with
replicated experts computes). Expert parallel: this rank's micro-batch, experts sharded, DDP for the
rest, expert gradients reduced. Writes the differences to OUT_DIR/{SCENARIO}-rank{R}.json; the test
asserts.
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
from torch.nn.parallel import DistributedDataParallel

from distill.models import GPT, ModelConfig, lm_loss
from distill.moe import MoEConfig
from distill.parallel.grads import clip_grad_norm_expert_parallel, reduce_expert_grads
from distill.parallel.groups import ExpertGroups
from distill.parallel.shard import (
    consolidate_optimizer_state,
    consolidate_state_dict,
    ddp_ignore_experts,
    shard_experts,
    slice_optimizer_state,
    unshard_experts,
)

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


class Objective(nn.Module):
    """The LM objective (CE + aux + z, as LMModule trains) as a module DDP can wrap. (LMModule itself
    would import Lightning, which costs each worker seconds.)"""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(ids[:, :-1])
        ce = lm_loss(out.logits, ids[:, 1:])
        return {"loss": ce + AUX_COEF * out.aux_loss + Z_COEF * out.z_loss, "ce": ce}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def run(out_dir: Path, ep_size: int, scenario: str, rank: int, world: int) -> None:
    spec = SCENARIOS[scenario]
    n_moe = len(spec["num_experts"])
    cfg = ModelConfig(name="t", vocab_size=VOCAB, d_model=32, n_layers=2 * n_moe, n_heads=2, max_seq_len=SEQ,
                      num_experts=spec["num_experts"], moe=spec["moe"])
    torch.manual_seed(0)
    ref = Objective(GPT(cfg))
    if spec.get("skew"):
        for layer in ref.model.moe_layers:
            layer.router.balance_bias[0] = 10.0
    model = copy.deepcopy(ref)
    ids = torch.randint(VOCAB, (world * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    micro = ids.split(BATCH)

    # reference: one process, all experts, the global batch as W micro-batches
    ref_losses = [ref(m) for m in micro]
    ref_loss = torch.stack([t["loss"] for t in ref_losses]).mean()
    ref_loss.backward()
    with torch.no_grad():
        full_ce = ref(ids)["ce"]  # one forward over the whole global batch

    # expert parallel
    groups = ExpertGroups(ep_size, rank, world, timedelta(seconds=60))
    shards = shard_experts(model, groups)
    expert_names = {name: s.layout for s in shards for name, _ in s.named_parameters()}
    ddp_ignore_experts(model, shards)
    ddp = DistributedDataParallel(model)
    received = []  # rows each local expert group computes, per MoE layer
    for s in shards:
        s.experts.register_forward_pre_hook(lambda mod, args: received.append(int(args[1].sum())))
    terms = ddp(micro[rank])
    terms["loss"].backward()
    reduce_expert_grads(shards, world)

    losses = torch.stack([terms["loss"].detach(), terms["ce"].detach()])
    dist.all_reduce(losses)
    losses /= world
    ref_params = dict(ref.named_parameters())

    def ref_grad(name: str) -> torch.Tensor:
        """The reference gradient of `name`, cut to this rank's experts for an expert parameter."""
        grad = ref_params[name].grad
        lay = expert_names.get(name)
        return grad if lay is None else grad[lay.expert_offset : lay.expert_offset + lay.num_local]

    grad_diff = {}
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == ref_grad(name).shape, name
        grad_diff[name] = max_diff(p.grad, ref_grad(name))

    # clipping by the norm of the full model
    norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    norm_ep = clip_grad_norm_expert_parallel(model.parameters(), 0.05, shards, world)
    clipped_diff = max(max_diff(p.grad, ref_grad(n)) for n, p in model.named_parameters())

    # one AdamW step; consolidated checkpoints equal the one-process ones, slicing gives the local state back.
    # (A large eps keeps the update smooth in the gradient: with eps=1e-8, g / (|g| + eps) turns a 1e-9
    # gradient difference near g = 0 into a full +-lr step.)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-3)
    opt_ep = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3)
    opt_ref.step()
    opt_ep.step()
    state_full = consolidate_state_dict(model.state_dict(), shards)
    osd_full = consolidate_optimizer_state(opt_ep.state_dict(), opt_ep, shards)
    result = {"rank": rank, "received": received, "loss_ep": losses[0].item(), "loss_ref": ref_loss.item(),
              "ce_ep": losses[1].item(), "ce_full_batch": full_ce.item(), "grad_diff": grad_diff,
              "norm_ep": norm_ep.item(), "norm_ref": norm_ref.item(), "clipped_grad_diff": clipped_diff,
              "layouts": {n: [lay.group_size, lay.expert_offset, lay.num_local] for n, lay in expert_names.items()}}
    if rank == 0:
        ref_state, ref_osd = ref.state_dict(), opt_ref.state_dict()
        result["state_shapes_equal"] = all(state_full[k].shape == v.shape for k, v in ref_state.items())
        result["state_diff"] = max(max_diff(state_full[k], v) for k, v in ref_state.items())
        result["opt_state_diff"] = max(
            max_diff(state_full_v, ref_osd["state"][i][k])
            for i, st in osd_full["state"].items() for k, state_full_v in st.items() if k != "step"
        )
        local = slice_optimizer_state(osd_full, opt_ep, shards)
        mine = opt_ep.state_dict()
        result["opt_slice_roundtrip_diff"] = max(
            max_diff(v, mine["state"][i][k]) for i, st in local["state"].items() for k, v in st.items()
        )
    # after the run: the whole model back on every rank, equal to the reference after its step
    unshard_experts(shards)
    result["unsharded_diff"] = max(max_diff(p, ref_params[n]) for n, p in model.named_parameters())
    (out_dir / f"{scenario}-rank{rank}.json").write_text(json.dumps(result))


def main(out_dir: Path, ep_size: int, scenarios: list[str]) -> None:
    torch.set_num_threads(1)  # several ranks share few cores
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    for scenario in scenarios:
        run(out_dir, ep_size, scenario, dist.get_rank(), dist.get_world_size())
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","))
