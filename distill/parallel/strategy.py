"""`MeshStrategy`: Lightning's `ModelParallelStrategy` with the layout of a `parallel` config node
(docs/architecture.md, "Parallel layouts"; usage in README.md).

What it adds, in the order Lightning calls it:

- `_configure_launcher` / `connect`: ConfigError for a layout that does not fit the world, or experts that
  do not split, before any process group exists;
- `setup_environment`: the process group and the `ParallelMesh` (no `configure_model` hook needed);
- `setup`: `parallelize(module.model, mesh)`: experts sharded over `ep`, FSDP2 over the data-parallel
  ranks; a DistillModule's teacher is laid out on its own mesh (`teacher_layout`) when it is loaded,
  reading only this rank's slices when its loader can (`teachers.base.TeacherLoader.sharded`);
- `optimizer_step`: the aux-loss-free balancing counts are summed over all ranks before the bias moves;
  gradient clipping uses the norm of the full model;
- checkpoints: DCP directories written atomically by every rank (its own shards only); any layout resumes
  them, and a one-process `.ckpt` file too.

Select it from Hydra with `strategy=mesh` (the layout is the `parallel` node) or `strategy=expert_parallel`
(a named layout: the experts over the devices of a node). It is not registered in Lightning's
StrategyRegistry: a registration made as an import side effect is missing in a process that unpickles a
job (submitit) without importing this module first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from distill.errors import ConfigError, NonFiniteError
from distill.parallel.checkpoint import (
    architecture_mismatch,
    inspect_sharded,
    is_sharded_checkpoint,
    load_sharded,
    save_sharded,
)
from distill.parallel.config import ParallelConfig, parallel_config
from distill.parallel.dispatch import CommTimer
from distill.parallel.grads import all_reduce_balance_counts, clip_grad_norm_
from distill.parallel.mesh import ParallelMesh
from distill.parallel.parallelize import check_moe_layers, is_parallelized, parallelize, parallelize_frozen
from distill.parallel.tensor import check_tensor_parallel


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


class MeshStrategy(ModelParallelStrategy):
    """FSDP2 + expert parallelism (+ HSDP) on one device mesh.

    Args:
        layout: the `parallel` node (`ParallelConfig` or a mapping): dp_replicate, dp_shard, ep (-1: the rest).
        teacher_layout: the teacher's own layout (`teacher.parallel`); None: the student's.
        timeout_s: timeout of every process group, in seconds (short in tests: a hung collective then fails).
        process_group_backend: "gloo", "nccl" (default: the accelerator's).
    """

    def __init__(self, layout: ParallelConfig | Mapping[str, Any] | None = None,
                 teacher_layout: ParallelConfig | Mapping[str, Any] | None = None,
                 timeout_s: float | None = None, process_group_backend: str | None = None) -> None:
        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else default_pg_timeout
        super().__init__(save_distributed_checkpoint=True, process_group_backend=process_group_backend,
                         timeout=timeout)
        self._layout_cfg = parallel_config(layout or {}, "parallel")
        self._teacher_cfg = None if teacher_layout is None else parallel_config(teacher_layout, "teacher.parallel")
        self.layout: ParallelConfig | None = None
        self.teacher_layout: ParallelConfig | None = None
        self.mesh: ParallelMesh | None = None
        self._teacher_mesh: ParallelMesh | None = None
        self.comm_timer = CommTimer()

    # -- layout checks, before any process group work ---------------------------------------------

    def _resolve_layouts(self) -> None:
        world = self.num_nodes * self.num_processes
        self.layout = self._layout_cfg.resolve(world, "parallel")
        self.teacher_layout = (self._teacher_cfg or self._layout_cfg).resolve(
            world, "teacher.parallel" if self._teacher_cfg else "parallel")

    def _configure_launcher(self) -> None:
        self._resolve_layouts()
        super()._configure_launcher()

    def connect(self, model: LightningModule) -> None:
        if self.layout is None:
            self._resolve_layouts()
        assert self.layout is not None
        inner = getattr(model, "model", None)
        if isinstance(inner, nn.Module) and not is_parallelized(inner):
            check_moe_layers(inner, self.layout.ep)
            check_tensor_parallel(inner.cfg, self.layout.tp)
        super().connect(model)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        tp = self.layout.tp if self.layout is not None else 1
        # the ranks of a tensor-parallel group (tp consecutive ranks) read the same batch
        return {"num_replicas": self.world_size // tp, "rank": self.global_rank // tp}

    def setup_environment(self) -> None:
        self._setup_distributed()
        if self.layout is None:
            self._resolve_layouts()
        assert self.layout is not None and self.teacher_layout is not None
        device = self.root_device.type
        self.mesh = ParallelMesh(self.layout, device)
        self._teacher_mesh = (self.mesh if self.teacher_layout == self.layout
                              else ParallelMesh(self.teacher_layout, device))
        self._device_mesh = self.mesh.dense
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    # -- layout -----------------------------------------------------------------------------------

    def setup(self, trainer: Trainer) -> None:
        module = self.lightning_module
        assert module is not None and self.mesh is not None and self.model is not None
        self.accelerator.setup(trainer)
        model = module.model
        if not is_parallelized(model):
            parallelize(model.to(self.root_device), self.mesh, timer=self.comm_timer)
            held = sum(p.to_local().numel() for p in model.parameters())
            rank_zero_info(f"mesh: {self.layout.describe()} over {self.world_size} ranks; rank 0 holds "
                           f"{held:,} of {model.num_params():,} parameters.")
        self._wrap_teacher(module)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # the full model's norm

    def _wrap_teacher(self, module: LightningModule) -> None:
        """A DistillModule's teacher is laid out on the teacher mesh when it is loaded."""
        loader = getattr(module, "teacher_loader", None)
        if loader is None or getattr(loader, "_mesh_strategy", False):
            return
        module.teacher_loader = _TeacherOnMesh(loader, self)

    def load_teacher(self, loader: Callable[[], nn.Module]) -> nn.Module:
        """The teacher on its mesh: read slice by slice when the loader can, else loaded whole and sharded."""
        assert self._teacher_mesh is not None and self.teacher_layout is not None
        sharded = getattr(loader, "sharded", None)
        if callable(sharded):
            teacher = sharded(self._teacher_mesh)
        else:
            teacher = parallelize_frozen(loader().to(self.root_device), self._teacher_mesh, timer=self.comm_timer)
        held = sum(p.to_local().numel() for p in teacher.parameters())
        rank_zero_info(f"mesh: teacher loaded at {self.teacher_layout.describe()}; rank 0 holds {held:,} of "
                       f"{sum(p.numel() for p in teacher.parameters()):,} of its parameters.")
        return teacher

    # -- gradients ----------------------------------------------------------------------------------

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_then_counts() -> Any:
            result = closure()  # forward + backward (FSDP has reduce-scattered the gradients)
            all_reduce_balance_counts(self.lightning_module, copies=self.layout.tp)
            return result

        return super().optimizer_step(optimizer, closure_then_counts, model, **kwargs)

    def _clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        clip_grad_norm_([p for group in _unwrap(optimizer).param_groups for p in group["params"]], clip_val)

    # -- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        bad = _first_nonfinite(state["state_dict"])
        flag = torch.tensor([0.0 if bad is None else 1.0])
        if self.reduce(flag, reduce_op="sum").item() > 0:
            raise NonFiniteError(
                f"weights `{bad or 'on another rank'}` hold NaN/Inf at step {checkpoint.get('global_step')}: "
                f"checkpoint {path.name} was not written (the earlier checkpoints are intact).")
        save_sharded(state, checkpoint, path)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        assert self.lightning_module is not None
        if not is_sharded_checkpoint(path):
            return self._load_file_checkpoint(path, weights_only)
        problem, _ = inspect_sharded(path)  # every rank reads the same files: all raise alike, before DCP
        model_state = get_model_state_dict(self.lightning_module)
        problem = problem or _architecture(path, model_state)
        if problem is not None:
            raise ConfigError("resume", f"cannot resume from {path}: {problem}.",
                              "pass a checkpoint of this model, resume=auto or resume=never.")
        state: dict[str, Any] = {"state_dict": model_state}
        state.update({f"optimizer_{i}": get_optimizer_state_dict(self.lightning_module, _unwrap(o))
                      for i, o in enumerate(self.optimizers)})
        meta = load_sharded(state, path)
        self.lightning_module.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        for i, opt in enumerate(self.optimizers):
            set_optimizer_state_dict(self.lightning_module, _unwrap(opt), optim_state_dict=state[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        return meta

    def _load_file_checkpoint(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        """A one-process `.ckpt` file (strategy=auto): every rank memory-maps it and keeps its shards. Its
        optimizer state is keyed by position in the optimizer's parameter groups, which are rebuilt in the
        same order here, so each position is mapped to its parameter's name (Lightning's own conversion
        assumes the order of `named_parameters`, which the weight-decay groups do not keep)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        module = self.lightning_module
        assert module is not None
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only is not False)
        full = StateDictOptions(full_state_dict=True, strict=module.strict_loading)
        set_model_state_dict(module, ckpt.pop("state_dict"), options=full)
        names = {id(p): n for n, p in module.named_parameters()}
        for opt, saved in zip(self.optimizers, ckpt.pop("optimizer_states", [])):
            order = [names[id(p)] for group in _unwrap(opt).param_groups for p in group["params"]]
            keyed = {"state": {order[i]: v for i, v in saved["state"].items()},
                     "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
            set_optimizer_state_dict(module, _unwrap(opt), keyed, options=full)
        return ckpt

    def teardown(self) -> None:
        self.precision_plugin.__dict__.pop("clip_grad_by_norm", None)
        module = self.lightning_module
        loader = getattr(module, "teacher_loader", None)
        if isinstance(loader, _TeacherOnMesh):
            module.teacher_loader = loader.inner
        super().teardown()


class _TeacherOnMesh:
    """A module's teacher loader, wrapped so that the teacher is laid out on the strategy's teacher mesh."""

    _mesh_strategy = True

    def __init__(self, inner: Callable[[], nn.Module], strategy: MeshStrategy):
        self.inner = inner
        self.load = partial(strategy.load_teacher, inner)

    def __call__(self) -> nn.Module:
        return self.load()


def _first_nonfinite(state: Mapping[str, Any]) -> str | None:
    for name, value in state.items():
        local = value.to_local() if hasattr(value, "to_local") else value
        if isinstance(local, torch.Tensor) and local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return name
    return None


def _architecture(path: Path, model_state: Mapping[str, Any]) -> str | None:
    mismatch = architecture_mismatch(path, model_state)
    return None if mismatch is None else f"it holds a model of another architecture ({mismatch})"
