"""The plan of one layout: `plan_layout` puts the shares, the activation estimate and the communication
together into a `LayoutPlan`, with the `Memory` of the largest and the smallest rank (fp32 parameters,
gradients and AdamW states, activations, the transient gathered parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.models import GPT
from distill.models.config import ModelConfig
from distill.parallel.config import ParallelConfig
from distill.plan.activations import _dtype_bytes, activation_bytes
from distill.plan.comm import AllToAll, _units, communication
from distill.plan.shares import Share, meta_model, param_numel, shares

ADAMW_STATES = 2  # exp_avg, exp_avg_sq (fp32, shaped like the parameter's shard)
STEP_BYTES = 4  # AdamW's step counter: one fp32 scalar per parameter tensor


@dataclass
class Memory:
    """Bytes on one rank."""

    params: int
    grads: int
    optimizer: int
    activations: int
    transient: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.transient



@dataclass
class LayoutPlan:
    """What `plan_layout` found: the memory of the largest (and smallest) rank, the communication per step."""

    model: ModelConfig
    layout: ParallelConfig
    world: int
    devices: int
    micro_batch: int
    seq_len: int
    act_bytes: int  # activation / all-gather element size
    drop_duplicate_tokens: bool
    total_params: int
    active_params: int
    shares: list[Share]
    memory: Memory  # the largest rank
    smallest: Memory
    largest_ranks: int  # ranks holding the most
    comm: dict[bool, dict[str, float]]  # drop_duplicate_tokens -> collective -> bytes per rank per step
    alltoall: dict[bool, list[AllToAll]]
    activation_parts: dict[str, int]

    def rank_params(self, rank: int) -> int:
        """Parameter bytes on global `rank` (fp32)."""
        return 4 * param_numel(self.shares, self.layout, rank)


def plan_layout(cfg: ModelConfig, layout: ParallelConfig, micro_batch: int, seq_len: int, world: int | None = None,
                devices: int | None = None, model: GPT | None = None) -> LayoutPlan:
    """The plan of `cfg` on the resolved `layout`; `devices`: ranks per node (None: one node holds the world);
    `model`: its meta-device GPT when already built."""
    model = model if model is not None else meta_model(cfg)
    world = world or layout.dp_replicate * layout.dp_shard * layout.ep * layout.tp
    devices = devices or world
    plan_shares = shares(model, layout)
    n_dense = layout.dp_shard * layout.ep
    numels = [sum(s.numel(s.index(q)) for s in plan_shares) for q in range(n_dense)]
    parts = activation_bytes(model, layout, micro_batch, seq_len)
    pb, rb = _dtype_bytes(layout.param_dtype), _dtype_bytes(layout.reduce_dtype)
    units = _units(plan_shares)
    gathered = {u: padded for u, (_, padded) in units.items()}
    blocks = {}  # block -> its dense unit and its experts, gathered together
    for u, padded in gathered.items():
        if u != "root":
            blocks[u.split(".ffn")[0]] = blocks.get(u.split(".ffn")[0], 0) + padded
    largest = max(blocks.values(), default=0)
    held = gathered["root"] + (largest if layout.reshard_after_forward else sum(blocks.values()))
    T = micro_batch * seq_len
    transient = held * pb + largest * max(pb, rb) + T * cfg.vocab_size // layout.tp * 4  # + unsharded grads, dlogits

    def memory(numel: int) -> Memory:
        return Memory(params=4 * numel, grads=4 * numel, optimizer=ADAMW_STATES * 4 * numel + STEP_BYTES * len(plan_shares),
                      activations=parts["total"], transient=transient)

    J = layout.ep_intra if layout.ep_intra is not None else (devices // layout.tp if devices % layout.tp == 0 else None)
    comm, a2a = {}, {}
    for dup in (True, False):
        comm[dup], a2a[dup] = communication(model, layout, plan_shares, micro_batch, seq_len, dup, J)
    return LayoutPlan(
        model=cfg, layout=layout, world=world, devices=devices, micro_batch=micro_batch, seq_len=seq_len,
        act_bytes=_dtype_bytes(layout.param_dtype),
        drop_duplicate_tokens=bool(getattr(layout, "drop_duplicate_tokens", True)),
        total_params=model.num_params(), active_params=model.num_active_params(), shares=plan_shares,
        memory=memory(max(numels)), smallest=memory(min(numels)), largest_ranks=numels.count(max(numels)) * (
            layout.tp * layout.dp_replicate), comm=comm, alltoall=a2a, activation_parts=parts)
