"""The Lightning Trainer of a stage: `conf/trainer/` instantiated with the callbacks every stage uses.

Checkpoints are written atomically and never with NaN/Inf weights (`AtomicCheckpointIO`); the RNG stream
of the training steps is checkpointed (`TrainingRNG`); a NaN/Inf loss term or gradient stops the run
before the optimizer step (`NonFiniteGuard`); rank 0 writes each batch's loss terms to
``<out_dir>/losses.jsonl`` (`StepLossRecorder`); `Throughput` measures training speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from distill.config import CheckpointConfig, TrainerConfig
from distill.train.checkpoint_io import AtomicCheckpointIO
from distill.train.loss_log import LOSSES, StepLossRecorder
from distill.train.nonfinite import NonFiniteGuard
from distill.train.resume import CHECKPOINT_DIR
from distill.train.rng import TrainingRNG
from distill.train.throughput import Throughput


def build_strategy(strategy: dict[str, Any]) -> Any:
    """A resolved `strategy` node: a strategy object from its `_target_`, or the name Lightning knows."""
    if "_target_" in strategy:
        return instantiate(strategy)
    return strategy.get("name", "auto")


def build_trainer(trainer: TrainerConfig, checkpoint: CheckpointConfig, strategy: dict[str, Any], out_dir: Path,
                  logger: Any, extra_callbacks: list | None = None) -> tuple[L.Trainer, Throughput]:
    """The stage's Trainer and its `Throughput` callback (the summary reads the average speed from it)."""
    ckpt = ModelCheckpoint(
        dirpath=str(out_dir / CHECKPOINT_DIR),
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=checkpoint.every_n_steps,
        save_last=checkpoint.save_last,
        save_top_k=-1,
        enable_version_counter=False,  # a resumed run that redoes step N overwrites stepN.ckpt (and last.ckpt)
    )
    throughput = Throughput()
    callbacks: list = [ckpt, TrainingRNG(), NonFiniteGuard(), throughput, StepLossRecorder(out_dir / LOSSES),
                       *(extra_callbacks or [])]
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    built = build_strategy(strategy)
    own_io = getattr(built, "_checkpoint_io", None) is not None  # a strategy that brings its own IO keeps it
    plugins: list = [] if own_io else [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # submitit owns requeue (USR2 + max_num_timeout): Lightning must not
        plugins.append(SLURMEnvironment(auto_requeue=False))
    node = OmegaConf.structured(trainer)
    return instantiate(node, _convert_="all", strategy=built, plugins=plugins or None, logger=logger, callbacks=callbacks,
                       default_root_dir=str(out_dir)), throughput
