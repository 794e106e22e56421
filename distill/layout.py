"""The `strategy` config node, resolved once: the strategy's arguments and the expert-parallel layout.

``strategy`` is either ``{name: <a strategy Lightning knows by name>}`` (conf/strategy/auto.yaml) or a node
with ``_target_`` (a strategy class and its arguments, e.g. conf/strategy/expert_parallel.yaml). Every
key must be an argument of the target; for expert parallelism, ``ep_size`` (null: the processes of one
node) must divide the world size and every MoE layer's expert count must split over its group.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from distill.errors import ConfigError
from distill.models.config import ModelConfig


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
                          "select a config of conf/strategy/ (auto, ddp, expert_parallel) or an importable "
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


def check_expert_parallel(ep: Any, world: int | None, num_nodes: int, models: Iterable[ModelConfig]) -> None:
    """``ep`` (strategy.ep_size; None: the processes of one node) divides the world size, and every MoE
    layer's experts split over its group. Nothing to check while the world size is unknown (devices=auto)."""
    from distill.parallel.groups import check_world, default_ep_size, layer_group_size

    if ep is None:
        if world is None:  # the strategy derives it at launch
            return
        ep = default_ep_size(world // num_nodes)
    if world is None:
        check_world(ep, ep)  # the type / range message only
        return
    check_world(world, ep)
    for model in models:
        for experts in model.num_experts:
            layer_group_size(experts, ep, what=f"a MoE layer of {model.name}")


def resolve_strategy(node: Mapping[str, Any], world: int | None, num_nodes: int,
                     models: Iterable[ModelConfig]) -> dict[str, Any]:
    """The checked `strategy` node as a plain dict (`distill.train.trainer.build_strategy` builds it)."""
    strategy = dict(node)
    if "_target_" not in strategy:
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
    if "ep_size" in strategy:
        check_expert_parallel(strategy["ep_size"], world, num_nodes, models)
    return strategy
