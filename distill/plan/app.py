"""The Hydra app ``python -m distill.plan``: `resolve_plan` checks the composed `plan` config into a `PlanSpec`,
`main` prints the plan of its layout, and `check_fits` refuses a layout whose largest rank needs more than
`plan.device_memory_gb`, naming the layouts of the same world, one step away, that fit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from distill.config import PlanConfig, PlanSettings, TrainerConfig, register_configs
from distill.data.config import DataConfig
from distill.errors import ConfigError, exit_on_config_error
from distill.hydra_errors import check_known_keys
from distill.layout import check_layout
from distill.models import GPT
from distill.models.config import ModelConfig
from distill.parallel.config import ParallelConfig
from distill.plan.activations import sequence_parallel
from distill.plan.layout import LayoutPlan, plan_layout
from distill.plan.report import GiB, format_plan
from distill.plan.shares import meta_model

# ----------------------------------------------------------------------------------------------------
# the app's config


@dataclass
class PlanSpec:
    """The resolved `plan` config: what `plan_layout` needs, checked."""

    model: ModelConfig
    layout: ParallelConfig  # resolved: every dimension a size
    world: int
    devices: int  # ranks per node (trainer.devices)
    micro_batch: int
    seq_len: int
    device_memory_gb: float | None


def resolve_plan(cfg: DictConfig) -> PlanSpec:
    """The composed `plan` config -> a PlanSpec; ConfigError naming the first bad key."""
    check_known_keys(OmegaConf.to_container(cfg, resolve=False), PlanConfig)  # type: ignore[arg-type]
    model: ModelConfig = OmegaConf.to_object(cfg.model).validate()  # type: ignore[union-attr]
    data: DataConfig = OmegaConf.to_object(cfg.data).validate()  # type: ignore[union-attr]
    trainer: TrainerConfig = OmegaConf.to_object(cfg.trainer).validate()  # type: ignore[union-attr]
    settings: PlanSettings = OmegaConf.to_object(cfg.plan)  # type: ignore[assignment]
    world = trainer.world_size
    if world is None:
        raise ConfigError("trainer.devices", f"the planner needs the number of devices per node, got "
                          f"{trainer.devices!r}.", "e.g. trainer.devices=8 trainer.num_nodes=2.")
    devices = world // trainer.num_nodes
    parallel: ParallelConfig = OmegaConf.to_object(cfg.parallel)  # type: ignore[assignment]
    check_layout(parallel, world, "parallel", [model], ranks_per_node=devices)  # the training apps' checks
    layout = parallel.resolve(world)
    if data.seq_len > model.max_seq_len:
        raise ConfigError("data.seq_len", f"{data.seq_len} exceeds model.max_seq_len={model.max_seq_len}.",
                          f"e.g. data.seq_len={model.max_seq_len}.")
    if sequence_parallel(layout) and data.seq_len % layout.tp:
        raise ConfigError("data.seq_len", f"parallel.sequence_parallel splits the sequence over parallel.tp="
                          f"{layout.tp} ranks, but data.seq_len={data.seq_len}.",
                          f"use a data.seq_len that is a multiple of {layout.tp}.")
    memory = settings.device_memory_gb
    if memory is not None and not 0 < memory < math.inf:
        raise ConfigError("plan.device_memory_gb", f"must be > 0 (GiB) or null, got {memory}.",
                          "e.g. plan.device_memory_gb=80 (null: no limit).")
    return PlanSpec(model, layout, world, devices, data.batch_size, data.seq_len, memory)


# ----------------------------------------------------------------------------------------------------
# does it fit


def _alternatives(spec: PlanSpec) -> Iterable[tuple[str, ParallelConfig]]:
    """Layouts of the same world one step away from `spec.layout`: a factor 2 moved into dp_shard, ep or tp,
    or more activation checkpointing."""
    lay = spec.layout
    moves = [("dp_replicate", "dp_shard"), ("dp_shard", "ep"), ("dp_shard", "tp"), ("dp_replicate", "tp")]
    for src, dst in moves:
        if getattr(lay, src) % 2 == 0:
            yield (f"parallel.{src}={getattr(lay, src) // 2} parallel.{dst}={getattr(lay, dst) * 2}",
                   dataclasses.replace(lay, **{src: getattr(lay, src) // 2, dst: getattr(lay, dst) * 2}))
    for mode in ("moe_only", "full"):
        if ("none", "moe_only", "full").index(mode) > ("none", "moe_only", "full").index(lay.activation_checkpointing):
            yield f"parallel.activation_checkpointing={mode}", dataclasses.replace(lay, activation_checkpointing=mode)


def check_fits(plan: LayoutPlan, spec: PlanSpec, model: GPT | None = None) -> None:
    """ConfigError naming `plan.device_memory_gb` when the largest rank needs more; the fix names the layouts of
    the same world, one step away, that fit (or the one that comes closest). `model`: the meta-device GPT."""
    limit = spec.device_memory_gb
    if limit is None or plan.memory.total <= limit * GiB:
        return
    tried = []
    for text, lay in _alternatives(spec):
        try:
            check_layout(lay, spec.world, "parallel", [spec.model], ranks_per_node=spec.devices)
        except ConfigError:
            continue
        if sequence_parallel(lay) and spec.seq_len % lay.tp:
            continue
        other = plan_layout(spec.model, lay, spec.micro_batch, spec.seq_len, spec.world, spec.devices, model)
        tried.append((other.memory.total, text))
    tried.sort()
    fitting = [f"{text} ({total / GiB:.1f} GiB)" for total, text in tried if total <= limit * GiB]
    if fitting:
        fix = "these layouts of the same devices fit: " + "; or ".join(fitting) + "."
    else:
        closest = f" (closest: {tried[0][1]}, {tried[0][0] / GiB:.1f} GiB)" if tried else ""
        fix = (f"more devices (trainer.num_nodes, with parallel.dp_shard or parallel.ep), a smaller data.batch_size, "
               f"or parallel.activation_checkpointing=full{closest}.")
    raise ConfigError("plan.device_memory_gb", f"the largest rank needs {plan.memory.total / GiB:.2f} GiB, more than "
                      f"the device's {limit:g} GiB (layout {plan.layout.describe()}).", fix)


register_configs()
# Absolute: Hydra takes a relative config_path from a module it imported (this one, run by __main__.py) as a
# package path (pkg://conf), which is not importable; the repository's conf/ is two directories up.
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="plan")
@exit_on_config_error
def main(cfg: DictConfig) -> LayoutPlan:
    spec = resolve_plan(cfg)
    model = meta_model(spec.model)
    plan = plan_layout(spec.model, spec.layout, spec.micro_batch, spec.seq_len, spec.world, spec.devices, model)
    print(format_plan(plan, spec.device_memory_gb), flush=True)
    check_fits(plan, spec, model)
    return plan
