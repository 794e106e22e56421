"""Where a stage's run sits: its Hydra multirun job, its rank, and its wandb id, group, name and mode."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.tracking.files import write_atomic

ID_FILE = "wandb_id.txt"


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


def stable_run_id(out_dir: Path) -> str:
    """The wandb run id of ``out_dir``: read from ``wandb_id.txt``, or created there (by rank 0 only)."""
    path = Path(out_dir) / ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # 8 lowercase hex characters, like wandb's own ids
    if env_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, run_id + "\n")
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
