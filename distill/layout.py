"""The `strategy` config node, resolved once: the strategy's arguments and the expert-parallel layout.

``strategy`` is either ``{name: <a strategy Lightning knows by name>}`` (conf/strategy/auto.yaml) or a node
with ``_target_`` (a strategy class and its arguments, e.g. conf/strategy/expert_parallel.yaml). Every
key must be an argument of the target. The mesh strategy (conf/strategy/mesh.yaml, expert_parallel.yaml) takes
its layout from the ``parallel`` node (and the teacher's from ``teacher.parallel``): it must fit the world
size, and every MoE layer's expert count must split over its expert-parallel group.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from distill.errors import ConfigError
from distill.models.config import ModelConfig
from distill.parallel.config import ParallelConfig


def _accepted_arguments(target: Any) -> set[str] | None:
    """Keyword arguments ``target`` (a class or function) accepts; None when it takes arbitrary ones."""
    if not inspect.isclass(target):
        params = inspect.signature(target).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return {p.name for p in params}
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    accepted: set[str] = set()
    for cls in target.__mro__:
        if "__init__" not in vars(cls):
            continue
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        accepted |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return accepted
        if cls is DDPStrategy:  # DDPStrategy's **kwargs go to torch's DistributedDataParallel
            ddp = list(inspect.signature(DistributedDataParallel.__init__).parameters)[2:]  # self, module
            return accepted | set(ddp)
    return None


def check_strategy_arguments(strategy: Mapping[str, Any]) -> None:
    """A `strategy` node with `_target_`: the target imports and takes every key given."""
    from hydra.utils import get_object

    from distill.hydra_errors import groups_with_key, suggest_key

    target = strategy["_target_"]
    try:
        obj = get_object(target)
    except Exception as err:
        raise ConfigError("strategy._target_", f"cannot import {target!r} ({err}).",
                          "select a config of conf/strategy/ (auto, ddp, mesh, expert_parallel) or an importable "
                          "class.") from None
    accepted = _accepted_arguments(obj)
    if accepted is None:
        return
    for key in strategy:
        if str(key).startswith("_") or key in accepted:
            continue
        options = groups_with_key("strategy", str(key))
        fix = (f"`{key}` belongs to strategy={options[0]}: select it (strategy={options[0]} strategy.{key}=...)."
               if options else suggest_key(str(key), sorted(accepted), "strategy"))
        raise ConfigError(f"strategy.{key}", f"is not an argument of {target}.", fix)


def _is_mesh_strategy(target: str) -> bool:
    """Whether ``target`` names the mesh strategy (or a subclass); False when it does not import
    (`check_strategy_arguments` names that)."""
    from hydra.utils import get_object

    from distill.parallel.strategy import MeshStrategy

    try:
        obj = get_object(target)
    except Exception:
        return False
    return isinstance(obj, type) and issubclass(obj, MeshStrategy)


def check_layout(layout: ParallelConfig, world: int | None, key: str, models: Iterable[ModelConfig],
                 ranks_per_node: int | None = None) -> None:
    """The layout fits the world (nothing to check while the world size is unknown: devices=auto), every
    MoE layer of ``models`` splits over its ``ep`` and their heads, vocabulary and hidden units over its ``tp``."""
    from distill.parallel.mesh import layer_group_size

    if world is None:
        return
    resolved = layout.resolve(world, key)
    if resolved.ep_intra is not None and ranks_per_node is not None:
        # an expert-parallel group's ranks are tp apart: a node holds devices / tp of its positions
        positions = ranks_per_node // resolved.tp if ranks_per_node % resolved.tp == 0 else ranks_per_node
        if positions % resolved.ep_intra:
            where = f"{ranks_per_node} (trainer.devices)" if resolved.tp == 1 else \
                f"{positions} (trainer.devices / {key}.tp)"
            raise ConfigError(f"{key}.ep_intra", f"{resolved.ep_intra} ranks per node inside an expert-parallel "
                              f"group, but a node holds {where}.",
                              f"use a divisor of trainer.devices, e.g. {key}.ep_intra={positions}, or null.")
    for model in models:
        for experts in model.num_experts:
            layer_group_size(experts, resolved.ep, what=f"a MoE layer of {model.name}", key=key)
        if resolved.tp > 1:
            from distill.parallel.tensor import check_tensor_parallel

            check_tensor_parallel(model, resolved.tp, key)


def _first_changed(layout: ParallelConfig) -> str:
    default = ParallelConfig()
    return next(k for k, v in dataclasses.asdict(layout).items() if v != getattr(default, k))


def resolve_strategy(node: Mapping[str, Any], world: int | None, models: Iterable[ModelConfig],
                     parallel: ParallelConfig, teacher_parallel: ParallelConfig | None = None,
                     teacher: ModelConfig | None = None, ranks_per_node: int | None = None) -> dict[str, Any]:
    """The checked `strategy` node as a plain dict (`distill.train.trainer.build_strategy` builds it). For the
    mesh strategy the layouts (``parallel``, ``teacher.parallel``) are checked against the world and the
    models (``teacher`` against its own layout) and handed to it."""
    strategy = dict(node)
    target = strategy.get("_target_")
    mesh = target is not None and _is_mesh_strategy(target)
    if not mesh:
        for key, layout in (("parallel", parallel), ("teacher.parallel", teacher_parallel)):
            if layout is not None and (key == "teacher.parallel" or layout != ParallelConfig()):
                changed = _first_changed(layout) if layout != ParallelConfig() else "ep"
                raise ConfigError(f"{key}.{changed}", f"sets a mesh layout, but the strategy "
                                  f"{target or strategy.get('name', 'auto')!r} does not use one.",
                                  "select strategy=mesh (or strategy=expert_parallel).")
    if target is None:
        unknown = sorted(set(strategy) - {"name"})
        if unknown:
            from distill.hydra_errors import groups_with_key

            key = unknown[0]
            options = groups_with_key("strategy", key)
            fix = (f"`{key}` belongs to strategy={options[0]}: select it (strategy={options[0]} strategy.{key}=...)."
                   if options else "select a strategy config of conf/strategy/ that takes it.")
            raise ConfigError(f"strategy.{key}", f"is not an argument of the strategy {strategy.get('name')!r}.", fix)
        strategy.setdefault("name", "auto")
        return strategy
    check_strategy_arguments(strategy)
    if mesh:
        models = list(models)
        check_layout(parallel, world, "parallel", models, ranks_per_node)
        if teacher is not None:
            check_layout(teacher_parallel or parallel, world,
                         "teacher.parallel" if teacher_parallel else "parallel", [teacher], ranks_per_node)
        strategy["layout"] = dataclasses.asdict(parallel)
        strategy["teacher_layout"] = None if teacher_parallel is None else dataclasses.asdict(teacher_parallel)
    return strategy

