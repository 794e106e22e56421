"""The logger of one stage: built from ``logger.*`` (wandb, csv or none) at its start, finished at its end."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from distill.errors import ConfigError
from distill.tracking.runs import run_group, run_name, stable_run_id, sweep_job, wandb_mode
from distill.tracking.summary import (
    StageCSVLogger,
    StageSummary,
    StageWandbLogger,
    SummarisedMixin,
    SummaryOnlyLogger,
)

KINDS = ("wandb", "csv", "none")
WANDB_SERVICE = "WANDB_SERVICE"  # wandb.env.SERVICE: the address of a running wandb-core service
log = logging.getLogger(__name__)


_OWN_SERVICE = False


def own_wandb_service() -> None:
    """A stage's wandb runs go through a service of its own process, started at its first run: a
    WANDB_SERVICE token inherited from the process that launched this one (a launcher, a test runner that
    used wandb itself) is dropped, once per process and before this process has used wandb. Sharing it, a
    requeued job meets its preempted attempt's unclosed stream there ("run ID ... is in use"), and one job
    tearing the service down would cut the others' runs."""
    global _OWN_SERVICE
    if _OWN_SERVICE:
        return
    _OWN_SERVICE = True
    if os.environ.pop(WANDB_SERVICE, None) is not None:
        log.info("wandb: not using the inherited service (%s); this process starts its own", WANDB_SERVICE)


def make_stage_logger(lcfg: Any, out_dir: Path, stage: str, run_config: dict[str, Any]) -> Logger:
    """The logger of one stage (see `distill.tracking`). wandb never needs a key: offline by default."""
    if lcfg.kind not in KINDS:
        raise ConfigError("logger.kind", f"unknown logger '{lcfg.kind}'.", "use wandb, csv or none.")
    out_dir = Path(out_dir)
    job = sweep_job()
    run_id = stable_run_id(out_dir) if lcfg.kind == "wandb" else None
    summary = StageSummary(out_dir, stage, run_id)
    if lcfg.kind == "none":
        return SummaryOnlyLogger(summary)
    if lcfg.kind == "csv":
        return StageCSVLogger(summary, save_dir=str(out_dir), name="csv", version="")
    mode = wandb_mode(lcfg)
    own_wandb_service()
    group = run_group(lcfg, job)
    config = dict(run_config)
    if job is not None:
        config["sweep"] = {"dir": str(job.sweep_dir), "job": job.num, "overrides": list(job.overrides)}
    return StageWandbLogger(
        summary,
        project=lcfg.project,
        entity=lcfg.entity,
        group=group,
        tags=list(lcfg.tags) or None,
        job_type=stage,
        name=run_name(stage, group, job),
        save_dir=str(out_dir),
        id=run_id,
        resume="allow",
        offline=mode == "offline",
        mode=mode,
        config=config,
    )


def finish_stage_logger(logger: Any, summary: Mapping[str, Any] | None = None) -> None:
    """Write the stage's final summary.json (``summary``: extra scalars, e.g. parameter counts) and close
    its wandb run, so that the next stage or multirun job starts a new one."""
    if isinstance(logger, SummarisedMixin | SummaryOnlyLogger) and rank_zero_only.rank == 0:
        logger.summary.write("finished", summary)
    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish()
