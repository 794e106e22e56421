"""`ExpertParallelStrategy`: Lightning's DDP strategy plus expert parallelism (docs/architecture.md; usage
in README.md, "Expert parallelism").

What it adds to DDP, in the order Lightning calls it:

- `_configure_launcher` / `connect`: ConfigError for a bad layout (world size not divisible by
  `ep_size`, experts not divisible by a layer's group size) before any process group exists;
- `setup_environment`: the process group, then the expert-parallel and expert-data-parallel groups;
- `setup`: every MoE layer keeps its slice of the experts and gets an all-to-all dispatcher; expert
  parameters are kept out of DDP; replicas are made equal; the teacher of a `DistillModule` is sharded
  the same way when it is loaded (the strategy wraps `module.teacher_loader`);
- `optimizer_step`: after the backward, expert gradients are summed over their EDP group and divided
  by the world size (and aux-loss-free balancing counts are summed over all ranks); gradient
  clipping uses the norm of the full model;
- checkpoints hold the full expert tensors (saving gathers them, loading slices them), model and
  optimizer state alike, so a run saved with one layout resumes with any other;
- `teardown`: the full experts are gathered back, so after `fit` the module is an ordinary
  one-process model (export, parameter counts).

Select it from Hydra with `strategy=expert_parallel` (conf/strategy/expert_parallel.yaml: its `_target_`
names this class), or pass an instance to `lightning.Trainer(strategy=...)`. It is deliberately not
registered under a name in Lightning's StrategyRegistry: a registration made as an import side effect is
missing in a process that unpickles a job (submitit) without importing this module first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from distill.parallel.dispatch import CommTimer
from distill.parallel.grads import clip_grad_norm_expert_parallel, reduce_expert_grads
from distill.parallel.groups import ExpertGroups, check_world, default_ep_size
from distill.parallel.shard import (
    ExpertShard,
    all_reduce_balance_counts,
    broadcast_expert_replicas,
    check_moe_layers,
    consolidate_optimizer_state,
    consolidate_state_dict,
    ddp_ignore_experts,
    shard_experts,
    slice_optimizer_state,
    slice_state_dict,
    unshard_experts,
)

NAME = "expert_parallel"


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def _held(shards: list[ExpertShard]) -> str:
    held = sum(p.numel() for s in shards for _, p in s.named_parameters())
    total = sum(p.numel() * s.layout.group_size for s in shards for _, p in s.named_parameters())
    return f"rank 0 holds {held:,} of {total:,}"


class ShardingTeacherLoader:
    """Wraps a module's `teacher_loader`: the loaded teacher keeps only this rank's experts."""

    def __init__(self, loader: Callable[[], nn.Module], shard: Callable[[nn.Module], nn.Module]):
        self.inner = loader
        self.shard = shard

    def __call__(self) -> nn.Module:
        return self.shard(self.inner())


class ExpertParallelStrategy(DDPStrategy):
    """DDP for the dense parameters, expert parallelism of size `ep_size` for the routed experts.

    Args:
        ep_size: ranks sharing one MoE layer's experts; must divide the world size. None: the
            processes of one node (`trainer.devices`).
        timeout_s: timeout of every process group, in seconds (short in tests; a hung collective
            then fails instead of waiting for Lightning's default 30 minutes).
        start_method: how Lightning starts local processes ("popen" re-runs the script, "spawn", ...).
        **kwargs: the rest of `DDPStrategy`'s arguments (process_group_backend, cluster_environment,
            find_unused_parameters, ...).
    """

    strategy_name = NAME

    def __init__(
        self,
        ep_size: int | None = None,
        timeout_s: float | None = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else default_pg_timeout
        super().__init__(timeout=timeout, start_method=start_method, **kwargs)
        self._ep_size = ep_size
        self.comm_timer = CommTimer()
        self.expert_groups: ExpertGroups | None = None
        self.shards: list[ExpertShard] = []  # the student's MoE layers while they are sharded
        self._failed = False

    @property
    def ep_size(self) -> int:
        return self._ep_size if self._ep_size is not None else default_ep_size(self.num_processes)

    # -- layout checks, before any process group work ---------------------------------------------

    def _configure_launcher(self) -> None:
        check_world(self.num_nodes * self.num_processes, self.ep_size)
        super()._configure_launcher()

    def connect(self, model: LightningModule) -> None:
        check_moe_layers(model, self.ep_size)  # the world was checked in _configure_launcher
        super().connect(model)

    def setup_environment(self) -> None:
        super().setup_environment()
        self.expert_groups = ExpertGroups(self.ep_size, self.global_rank, self.world_size, self._timeout)

    # -- sharding -----------------------------------------------------------------------------------

    def setup(self, trainer: Trainer) -> None:
        self._failed = False
        module = self.lightning_module
        assert module is not None and self.expert_groups is not None
        self.shards = shard_experts(module, self.expert_groups, self.comm_timer)
        ddp_ignore_experts(module, self.shards)
        if self.shards:
            rank_zero_info(
                f"{NAME}: ep_size={self.ep_size}, world {self.world_size}; MoE layers with "
                f"{[s.layout.num_experts for s in self.shards]} experts in groups of "
                f"{[s.layout.group_size for s in self.shards]} ranks; {_held(self.shards)} expert parameters."
            )
        self._wrap_teacher(module)
        super().setup(trainer)
        if self.shards:
            self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # the full model's norm

    def model_to_device(self) -> None:
        super().model_to_device()
        broadcast_expert_replicas(self.shards)

    def _wrap_teacher(self, module: LightningModule) -> None:
        """Shard a DistillModule's teacher when it is loaded (and now, if it is loaded already)."""
        loader = getattr(module, "teacher_loader", None)
        if loader is not None and not isinstance(loader, ShardingTeacherLoader):
            module.teacher_loader = ShardingTeacherLoader(loader, self.shard_teacher)
        teacher = getattr(module, "teacher", None)
        if isinstance(teacher, nn.Module):
            self.shard_teacher(teacher)

    def _unwrap_teacher(self, module: LightningModule | None) -> None:
        loader = getattr(module, "teacher_loader", None)
        if isinstance(loader, ShardingTeacherLoader):
            module.teacher_loader = loader.inner

    def shard_teacher(self, teacher: nn.Module) -> nn.Module:
        """Keep this rank's slice of a frozen model's experts (no gradients, no replica sync needed:
        every rank loaded the same weights). It stays sharded after the run (it is never saved)."""
        assert self.expert_groups is not None
        shards = shard_experts(teacher, self.expert_groups, self.comm_timer, what="the teacher's MoE layer")
        if shards:
            rank_zero_info(f"{NAME}: teacher loaded; {_held(shards)} of its expert parameters.")
        return teacher

    # -- gradients ----------------------------------------------------------------------------------

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_then_reduce() -> Any:
            result = closure()  # forward + backward (DDP has averaged the dense gradients)
            reduce_expert_grads(self.shards, self.world_size)
            if self.world_size > 1:
                all_reduce_balance_counts(self.lightning_module)
            return result

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    def _clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        params = [p for group in _unwrap(optimizer).param_groups for p in group["params"]]
        clip_grad_norm_expert_parallel(params, clip_val, self.shards, self.world_size)

    # -- checkpoints ----------------------------------------------------------------------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return consolidate_state_dict(super().lightning_module_state_dict(), self.shards)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return consolidate_optimizer_state(super().optimizer_state(optimizer), _unwrap(optimizer), self.shards)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self.shards:  # loading into an already sharded module: take the local slice
            checkpoint = {**checkpoint, "state_dict": slice_state_dict(checkpoint["state_dict"], self.shards)}
        super().load_model_state_dict(checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        states = [
            slice_optimizer_state(state, _unwrap(opt), self.shards)
            for opt, state in zip(self.optimizers, checkpoint["optimizer_states"])
        ]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})

    # -- the end --------------------------------------------------------------------------------------

    def on_exception(self, exception: BaseException) -> None:
        self._failed = True  # another rank may be gone: no collectives in teardown
        super().on_exception(exception)

    def teardown(self) -> None:
        if self.shards and not self._failed:
            unshard_experts(self.shards)
        self.shards = []
        self.precision_plugin.__dict__.pop("clip_grad_by_norm", None)
        self._unwrap_teacher(self.lightning_module)
        super().teardown()
