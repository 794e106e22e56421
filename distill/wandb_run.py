"""The logger of one stage: wandb (offline by default) or CSV, grouped by sweep, requeue-safe, with a summary.

Every stage (``cfg.stage``: pretrain, distill, or a pipeline stage) gets one run:

- ``group``: ``logger.group``, else inside a Hydra multirun the sweep directory's name, so every job of
  a sweep lands in one wandb group; ``job_type``: the stage; ``tags``: ``logger.tags`` (sweep configs
  set them).
- A stable run id, kept in ``<out_dir>/wandb_id.txt``: a job that SLURM requeues runs again in the same
  out_dir, resumes from its last checkpoint (``resume=auto``) and continues the same wandb run
  (``id=..., resume="allow"``). Offline runs of one id are uploaded in order by ``wandb sync``.
- Summary metrics: best validation loss (``min``) and the final values (``last``).
- ``<out_dir>/summary.json``: the stage's validation history and final metrics, rewritten after each
  validation and at the end (``status``: running -> finished). ``python -m distill.sweep`` reads it.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from distill.errors import ConfigError

ID_FILE = "wandb_id.txt"
SUMMARY_FILE = "summary.json"
KINDS = ("wandb", "csv", "none")
# wandb summaries (define_metric): the best validation loss is its minimum, the rest their final value.
SUMMARIES = {"val/loss": "min,last", "val/ppl": "last,min", "train/loss": "last", "val/kl_teacher": "last",
             "val/top1_agree": "last"}
# summary.json keys of the metrics the sweep report shows (logged name -> key).
SUMMARY_KEYS = {"val/loss": "val_loss", "val/ppl": "val_ppl", "train/loss": "train_loss",
                "val/kl_teacher": "val_kl_teacher", "val/top1_agree": "val_top1_agree",
                "perf/tokens_per_s": "train_tokens_per_s"}


@dataclass(frozen=True)
class SweepJob:
    """Where this process sits in a Hydra multirun."""

    sweep_dir: Path
    num: int
    overrides: tuple[str, ...]  # the job's task overrides
    swept: tuple[str, ...]  # the keys of `hydra.sweeper.params` (a sweep config's swept keys)


def sweep_job() -> SweepJob | None:
    """The current Hydra multirun job, or None (a single run, or no Hydra at all)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    params = hc.sweeper.get("params") or {}
    return SweepJob(Path(hc.sweep.dir), int(hc.job.num), tuple(hc.overrides.task), tuple(params))


def env_rank() -> int:
    """This process's global rank from the environment (Lightning's order), valid before a Trainer exists."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def stable_run_id(out_dir: Path) -> str:
    """The wandb run id of ``out_dir``: read from ``wandb_id.txt``, or created there (by rank 0 only)."""
    path = Path(out_dir) / ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # 8 lowercase hex characters, like wandb's own ids
    if env_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, run_id + "\n")
    return run_id


def run_group(lcfg: Any, job: SweepJob | None) -> str | None:
    """``logger.group``; inside a multirun, by default, the sweep directory's name."""
    if lcfg.group:
        return str(lcfg.group)
    return job.sweep_dir.name if job is not None else None


def default_group(fallback: str | None = None) -> str | None:
    """The group of a run whose ``logger.group`` is unset: the sweep's inside a multirun, else ``fallback``."""
    job = sweep_job()
    return job.sweep_dir.name if job is not None else fallback


def run_name(stage: str, group: str | None, job: SweepJob | None) -> str:
    if job is None:
        return f"{group}-{stage}" if group else stage
    swept = [o for o in job.overrides if o.lstrip("+~").split("=", 1)[0] in job.swept]
    return " ".join([f"{job.num}:{stage}", *swept])


def wandb_mode(lcfg: Any) -> str:
    """``logger.mode`` unless WANDB_MODE says otherwise (``dryrun``, set by WandbLogger, means offline)."""
    mode = os.environ.get("WANDB_MODE", lcfg.mode)
    return "offline" if mode == "dryrun" else mode


def _scalar(value: Any) -> float | None:
    try:
        v = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return v


def _json_value(v: Any) -> Any:
    """JSON-safe: non-finite floats become None, other objects their string."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, Mapping):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    s = _scalar(v)
    return _json_value(s) if s is not None else str(v)


class StageSummary:
    """The stage's metrics as ``summary.json``: last value of each metric, validation history, best val loss.

    A requeued run starts again from a checkpoint: the history it carries over is the part logged before
    the step where this process starts, so ``best_val_loss`` covers the whole run, not only this attempt.
    """

    def __init__(self, out_dir: Path, stage: str, run_id: str | None):
        self.path = Path(out_dir) / SUMMARY_FILE
        self.stage, self.run_id = stage, run_id
        self.last: dict[str, float] = {}
        self.val_history: list[tuple[int, float]] = []
        self.first_step: int | None = None
        self.last_step: int | None = None
        self._previous: list[tuple[int, float]] = []
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
                self._previous = [(int(s), float(v)) for s, v in old.get("val_history", [])]
            except (ValueError, TypeError):
                self._previous = []

    def update(self, metrics: Mapping[str, Any], step: int | None) -> bool:
        """Record one ``log_metrics`` call; True when it held validation metrics."""
        if step is not None:
            self.first_step = step if self.first_step is None else self.first_step
            self.last_step = step if self.last_step is None else max(self.last_step, step)
        for key, value in metrics.items():
            v = _scalar(value)
            if v is not None:
                self.last[key] = v
        if "val/loss" in self.last and "val/loss" in metrics and step is not None:
            loss = self.last["val/loss"]
            self.val_history = [(s, x) for s, x in self.val_history if s != step] + [(step, loss)]
            return True
        return False

    def history(self) -> list[tuple[int, float]]:
        start = self.first_step if self.first_step is not None else math.inf
        kept = [(s, v) for s, v in self._previous if s < start]
        return sorted(kept + self.val_history)

    def as_dict(self, status: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        history = self.history()
        finite = [v for _, v in history if math.isfinite(v)]
        out: dict[str, Any] = {"stage": self.stage, "status": status, "wandb_id": self.run_id,
                               "step": self.last_step, "first_step": self.first_step}
        out.update({key: self.last.get(name) for name, key in SUMMARY_KEYS.items() if name in self.last})
        out["best_val_loss"] = min(finite) if finite else None
        for key, value in (extra or {}).items():  # the app's own numbers (parameter counts, ...) win
            if key not in ("stage", "status") and (isinstance(value, (bool, int, float, str)) or value is None):
                out[key] = value
        out["val_history"] = [list(p) for p in history]
        out["metrics"] = dict(sorted(self.last.items()))
        return _json_value(out)

    def write(self, status: str, extra: Mapping[str, Any] | None = None) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, json.dumps(self.as_dict(status, extra), indent=2) + "\n")
        return self.path


class _Summarised:
    """Mixin: every logged metric also goes into the stage's :class:`StageSummary`."""

    summary: StageSummary

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.summary.update(metrics, step):
            self.summary.write("running")
        super().log_metrics(metrics, step)  # type: ignore[misc]


class StageWandbLogger(_Summarised, WandbLogger):
    """WandbLogger that defines the summary metrics when its run starts."""

    def __init__(self, summary: StageSummary, **kwargs: Any):
        super().__init__(**kwargs)
        self.summary = summary

    @property
    def experiment(self) -> Any:
        fresh = self._experiment is None
        run = super().experiment
        if fresh and rank_zero_only.rank == 0 and self._experiment is not None:
            for name, summary in SUMMARIES.items():
                run.define_metric(name, summary=summary)
        return run


class StageCSVLogger(_Summarised, CSVLogger):
    def __init__(self, summary: StageSummary, **kwargs: Any):
        super().__init__(**kwargs)
        self.summary = summary


class SummaryOnlyLogger(Logger):
    """``logger.kind=none``: nothing is logged anywhere, but the stage still writes its summary.json."""

    def __init__(self, summary: StageSummary):
        super().__init__()
        self.summary = summary

    @property
    def name(self) -> str:
        return "summary"

    @property
    def version(self) -> str:
        return ""

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.summary.update(metrics, step):
            self.summary.write("running")


def make_stage_logger(lcfg: Any, out_dir: Path, stage: str, run_config: dict[str, Any]) -> Logger:
    """The logger of one stage (see the module docstring). wandb never needs a key: offline by default."""
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
    if isinstance(logger, _Summarised | SummaryOnlyLogger) and rank_zero_only.rank == 0:
        logger.summary.write("finished", summary)
    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish()


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
    data = [[_json_value(v) for v in row] for row in rows]
    run.log({f"{job_type}/table": wandb.Table(columns=list(columns), data=data),
             **{f"{job_type}/{key}": wandb.Image(str(path)) for key, path in images.items() if Path(path).is_file()}})
    run.summary.update(_json_value(dict(summary)))
    run.finish()


def log_pipeline_report(cfg: Any, out_dir: Path, models: dict[str, dict[str, Any]], paths: Mapping[str, Path]) -> None:
    """The pipeline's report (one row per model, the validation-loss plot) as a wandb table and image."""
    from omegaconf import OmegaConf

    from distill.report import COLUMNS

    rows = [[name, *[row.get(k) for k in COLUMNS]] for name, row in models.items()]
    log_report(cfg.logger, out_dir, job_type="report", name="report", table=(["model", *COLUMNS], rows),
               images={"val_loss": paths["png"]},
               summary={f"{name}/val_loss": row.get("val_loss") for name, row in models.items()},
               config=OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg))
