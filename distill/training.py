"""What every Hydra app shares: seeding, loggers (wandb offline by default, or CSV), the Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from distill.config import LoggerConfig


def resolved_dict(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def make_logger(lcfg: LoggerConfig, out_dir: Path, stage: str, run_config: dict[str, Any]) -> Any:
    """One logger per stage (distill/wandb_run.py): wandb offline by default, grouped by sweep, a run id that
    survives requeue, and ``<out_dir>/summary.json``."""
    from distill.wandb_run import make_stage_logger

    return make_stage_logger(lcfg, out_dir, stage, run_config)


def finish_logger(logger: Any, summary: dict[str, Any] | None = None) -> None:
    """Write the stage's final summary.json (plus the scalars of ``summary``) and close its wandb run, so
    the next stage (or multirun job) starts a new one."""
    from distill.wandb_run import finish_stage_logger

    finish_stage_logger(logger, summary)


def build_strategy(strategy: Any) -> Any:
    if isinstance(strategy, (DictConfig, dict)) and "_target_" in strategy:
        return instantiate(strategy)
    return strategy


def build_trainer(cfg: Any, out_dir: Path, logger: Any, extra_callbacks: list | None = None) -> L.Trainer:
    """A Trainer from the `trainer`, `checkpoint` and `strategy` config nodes.

    Checkpoints are written atomically and never with NaN/Inf weights (`AtomicCheckpointIO`); the RNG stream
    of the training steps is checkpointed (`TrainingRNG`); rank 0 writes each batch's loss terms to
    ``<out_dir>/losses.jsonl``.
    """
    from distill.checkpointing import CHECKPOINT_DIR, AtomicCheckpointIO, TrainingRNG
    from distill.runinfo import LOSSES, StepLossRecorder

    t = cfg.trainer
    ckpt = ModelCheckpoint(
        dirpath=str(out_dir / CHECKPOINT_DIR),
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_steps,
        save_last=cfg.checkpoint.save_last,
        save_top_k=-1,
        enable_version_counter=False,  # a resumed run that redoes step N overwrites stepN.ckpt (and last.ckpt)
    )
    callbacks: list = [ckpt, TrainingRNG(), StepLossRecorder(out_dir / LOSSES), *(extra_callbacks or [])]
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    strategy = build_strategy(cfg.strategy)
    own_io = getattr(strategy, "_checkpoint_io", None) is not None  # a strategy that brings its own IO keeps it
    plugins: list = [] if own_io else [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # submitit owns requeue (USR2 + max_num_timeout): Lightning must not
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        precision=t.precision,
        strategy=strategy,
        plugins=plugins or None,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(out_dir),
        num_sanity_val_steps=0,
    )


def named_strategy(name: str) -> str:
    """`conf/strategy/auto.yaml`: a strategy Lightning knows by name."""
    return name
