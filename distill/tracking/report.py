"""Reports (a table and images) logged as their own wandb run in the sweep's or pipeline's group."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distill.tracking.files import json_value
from distill.tracking.runs import run_group, stable_run_id, sweep_job, wandb_mode


def log_report(
    lcfg: Any, out_dir: Path, *, job_type: str, name: str, table: tuple[list[str], list[list[Any]]],
    images: Mapping[str, Path], summary: Mapping[str, Any], config: dict[str, Any] | None = None,
) -> None:
    """Log a report (a table and images) as its own wandb run in the sweep's or pipeline's group."""
    if lcfg.kind != "wandb":
        return
    import wandb

    out_dir = Path(out_dir)
    group = run_group(lcfg, sweep_job())
    columns, rows = table
    run = wandb.init(project=lcfg.project, entity=lcfg.entity, group=group, job_type=job_type,
                     name=f"{group}-{name}" if group else name, dir=str(out_dir), mode=wandb_mode(lcfg),
                     tags=list(lcfg.tags) or None, config=config, id=stable_run_id(out_dir), resume="allow")
    data = [[json_value(v) for v in row] for row in rows]
    run.log({f"{job_type}/table": wandb.Table(columns=list(columns), data=data),
             **{f"{job_type}/{key}": wandb.Image(str(path)) for key, path in images.items() if Path(path).is_file()}})
    run.summary.update(json_value(dict(summary)))
    run.finish()


def log_pipeline_report(
    lcfg: Any, run_config: dict[str, Any], out_dir: Path, models: dict[str, dict[str, Any]],
    paths: Mapping[str, Path],
) -> None:
    """The pipeline's report (one row per model, the validation-loss plot) as a wandb table and image.

    ``lcfg``: the logger config (kind, project, entity, group, tags, mode); ``run_config``: the pipeline's
    resolved config as a plain dict, the report run's wandb config."""
    from distill.report import COLUMNS

    rows = [[name, *[row.get(k) for k in COLUMNS]] for name, row in models.items()]
    log_report(lcfg, out_dir, job_type="report", name="report", table=(["model", *COLUMNS], rows),
               images={"val_loss": paths["png"]},
               summary={f"{name}/val_loss": row.get("val_loss") for name, row in models.items()},
               config=dict(run_config))
