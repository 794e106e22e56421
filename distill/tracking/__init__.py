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

Modules: `runs` (where a run sits: sweep job, rank, id, group, name, mode), `summary` (summary.json and the
loggers that keep it), `loggers` (a stage's logger, start and finish), `report` (reports as their own
wandb runs), `files` (JSON-safe values, atomic writes).
"""

from distill.tracking.loggers import KINDS, finish_stage_logger, make_stage_logger
from distill.tracking.report import log_pipeline_report, log_report
from distill.tracking.runs import (
    ID_FILE,
    SweepJob,
    default_group,
    env_rank,
    run_group,
    run_name,
    stable_run_id,
    sweep_job,
    wandb_mode,
)
from distill.tracking.summary import (
    SUMMARIES,
    SUMMARY_FILE,
    SUMMARY_KEYS,
    StageCSVLogger,
    StageSummary,
    StageWandbLogger,
    SummarisedMixin,
    SummaryOnlyLogger,
)

__all__ = [
    "ID_FILE",
    "KINDS",
    "SUMMARIES",
    "SUMMARY_FILE",
    "SUMMARY_KEYS",
    "StageCSVLogger",
    "StageSummary",
    "StageWandbLogger",
    "SummarisedMixin",
    "SummaryOnlyLogger",
    "SweepJob",
    "default_group",
    "env_rank",
    "finish_stage_logger",
    "log_pipeline_report",
    "log_report",
    "make_stage_logger",
    "run_group",
    "run_name",
    "stable_run_id",
    "sweep_job",
    "wandb_mode",
]
