"""Top-level config schemas of the Hydra apps.

The YAML files under ``conf/`` are merged onto these dataclasses (each app's primary config lists its
schema first in its defaults list), so a misspelt key or a wrong type is rejected with the key's name
before anything runs. Each group's node is the dataclass of the code it configures: ``data`` ->
:class:`distill.data.DataConfig`, ``model`` -> :class:`distill.models.ModelConfig`, ``kd`` ->
:class:`distill.kd.KDConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore

from distill.data.config import DataConfig
from distill.kd import KDConfig
from distill.models.config import ModelConfig
from students.config import StudentConfig


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer`` that users set (the rest are derived)."""

    max_steps: int = 300
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: str = "32-true"
    val_check_interval: int = 50  # optimizer steps between validations
    limit_val_batches: int = 20
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class OptimConfig:
    """AdamW with decay groups, linear warm-up then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 30
    aux_coef: float = 0.01  # MoE load-balancing loss coefficient (DeepSpeed-MoE: 0.01)
    z_coef: float = 0.001  # router z-loss coefficient


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # "wandb" | "csv" | "none"
    project: str = "distill"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    mode: str = "offline"  # wandb mode; the WANDB_MODE environment variable wins


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100
    save_last: bool = True


@dataclass
class TeacherConfig:
    kind: str = "native"  # "native" (an export dir or .ckpt of this project) | "hf" (Hugging Face)
    path: Optional[str] = None


@dataclass
class RunConfig:
    """What every app shares."""

    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    strategy: Any = "auto"  # a Lightning strategy name, or a node with `_target_` (conf/strategy/)
    seed: int = 0
    stage: str = "pretrain"  # wandb job_type and the run's sub-directory
    out_dir: str = "."  # where checkpoints and the export go (defaults to the Hydra run dir)
    # "auto": continue from the newest readable checkpoint in <out_dir>/checkpoints when
    # there is one, else start fresh; "never" (or null): start fresh; or the path of a .ckpt file.
    resume: Optional[str] = "auto"


@dataclass
class PretrainConfig(RunConfig):
    """``python -m distill.pretrain``: train a teacher (or any model) on the LM objective."""

    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class DistillConfig(RunConfig):
    """``python -m distill.distill``: a Mixture-of-Students distilled from ``teacher.path``."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    stage: str = "distill"


@dataclass
class PipelineConfig(DistillConfig):
    """``python -m distill.pipeline`` (``make run``): teacher -> three students -> report."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the teacher's architecture, when pretrained
    teacher_max_steps: Optional[int] = None  # None -> trainer.max_steps
    gen_tokens: int = 64  # new tokens per sequence when measuring generation speed
    gen_batch: int = 4
    stage: str = "pipeline"


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="distill_schema", node=DistillConfig)
    cs.store(name="pipeline_schema", node=PipelineConfig)
