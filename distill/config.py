"""The config schema of the Hydra apps: one dataclass per config node, each with the checks of its values.

The YAML files under ``conf/`` are merged onto these dataclasses (each app's primary config lists its
schema first in its defaults list), so a misspelt key or a wrong type is rejected with the key's name
before anything runs. The nodes of the components are their own dataclasses (``data`` ->
:class:`distill.data.DataConfig`, ``model`` -> :class:`distill.models.ModelConfig`, ``kd`` ->
:class:`distill.kd.KDConfig`, ``student`` -> :class:`students.config.StudentConfig`). The ``validate``
methods run once per run, from :func:`distill.resolve.resolve` (docs/architecture.md, "Configuration").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore

from distill.data.config import DataConfig
from distill.data.vl_config import VLDataConfig
from distill.errors import ConfigError
from distill.evaluate.config import EvalSettings
from distill.kd import KDConfig
from distill.models.config import ModelConfig
from distill.models.vl_config import VLMoEConfig
from distill.parallel.config import ParallelConfig, TeacherParallelConfig
from distill.study import StudyConfig
from distill.vl.config import DownstreamConfig, VLStudentConfig, VLTeacherConfig
from distill.vl.masking import MaskingConfig
from students.config import StudentConfig

RESUME_AUTO, RESUME_FRESH = "auto", ("never", "none")


@dataclass
class TrainerConfig:
    """``lightning.Trainer`` (built with ``hydra.utils.instantiate``); logger, callbacks, strategy and
    plugins are added by :func:`distill.train.trainer.build_trainer`."""

    _target_: str = "lightning.pytorch.Trainer"
    max_steps: int = 300
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: str = "32-true"
    val_check_interval: int = 50  # optimizer steps between validations
    check_val_every_n_epoch: Optional[int] = None  # validation by steps, across epochs
    limit_val_batches: int = 20
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    enable_progress_bar: bool = True
    deterministic: bool = False

    def validate(self) -> TrainerConfig:
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ConfigError("trainer.max_steps", f"must be >= 1, got {self.max_steps}.",
                              "the learning-rate schedule and kd.stop_fraction need a finite run, e.g. 300.")
        devices = self.devices
        if isinstance(devices, int) and (devices == 0 or devices < -1):
            raise ConfigError("trainer.devices", f"must be >= 1, -1 (all) or auto, got {devices}.",
                              "e.g. trainer.devices=1.")
        if isinstance(devices, str) and devices != "auto" and not re.fullmatch(r"-?\d+|(\d+,)*\d+,?", devices):
            raise ConfigError("trainer.devices", f"cannot read {devices!r} as a device count or list.",
                              "use an integer, a list such as [0,1], or auto.")
        for key, low in (("num_nodes", 1), ("val_check_interval", 1), ("log_every_n_steps", 1),
                         ("accumulate_grad_batches", 1), ("limit_val_batches", 0)):
            value = getattr(self, key)
            if value < low:
                raise ConfigError(f"trainer.{key}", f"must be >= {low}, got {value}.",
                                  f"e.g. trainer.{key}={max(low, 1)}.")
        if self.gradient_clip_val is not None and not 0 <= self.gradient_clip_val < math.inf:
            raise ConfigError("trainer.gradient_clip_val",
                              f"must be >= 0 and finite, or null, got {self.gradient_clip_val}.",
                              "e.g. 1.0 (null: no clipping).")
        return self

    @property
    def world_size(self) -> int | None:
        """devices x num_nodes, or None when the device count is only known at launch (auto, -1)."""
        devices = self.devices
        if isinstance(devices, str) and re.fullmatch(r"\d+", devices):
            devices = int(devices)
        elif isinstance(devices, str) and "," in devices:
            devices = [d for d in devices.split(",") if d]
        if isinstance(devices, int) and devices >= 1:
            return devices * self.num_nodes
        if isinstance(devices, (list, tuple)):
            return len(devices) * self.num_nodes
        return None


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
    tile_size: Optional[int] = None  # elements per tile of the AdamW step (TiledAdamW); null: torch's AdamW
    # training loss from the hidden states by the fused, chunked LM head (distill/kd/fused.py): the full
    # [tokens x vocabulary] logits never exist; False (or a DTensor head: tp, FSDP) builds them (exact either way)
    fused_head: bool = True

    def validate(self) -> OptimConfig:
        if not 0 < self.lr < math.inf:
            raise ConfigError("optim.lr", f"must be > 0 and finite, got {self.lr}.", "e.g. optim.lr=3e-4.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}.", "e.g. 0.1.")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}.", "e.g. 30.")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}", f"must be in [0, 1), got {getattr(self, key)}.",
                                  "e.g. 0.9 and 0.95.")
        if not self.eps > 0:
            raise ConfigError("optim.eps", f"must be > 0, got {self.eps}.", "e.g. 1e-8.")
        for key in ("weight_decay", "aux_coef", "z_coef"):
            if not 0 <= getattr(self, key) < math.inf:
                raise ConfigError(f"optim.{key}", f"must be >= 0 and finite, got {getattr(self, key)}.",
                                  "0 turns it off.")
        if not isinstance(self.fused_head, bool):
            raise ConfigError("optim.fused_head", f"must be true or false, got {self.fused_head!r}.", "e.g. true.")
        tile = self.tile_size
        if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
            raise ConfigError("optim.tile_size", f"must be null or an int >= 1 (elements), got {tile!r}.",
                              "e.g. optim.tile_size=65536 (null: torch's AdamW, untiled).")
        return self


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # "wandb" | "csv" | "none"
    project: str = "distill"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    mode: str = "offline"  # wandb mode; the WANDB_MODE environment variable wins

    def validate(self) -> LoggerConfig:
        if self.kind not in ("wandb", "csv", "none"):
            raise ConfigError("logger.kind", f"unknown logger {self.kind!r}.", "use logger=wandb, csv or none.")
        return self


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100
    save_last: bool = True

    def validate(self) -> CheckpointConfig:
        if self.every_n_steps < 1:
            raise ConfigError("checkpoint.every_n_steps", f"must be >= 1, got {self.every_n_steps}.",
                              "e.g. checkpoint.every_n_steps=100.")
        return self


@dataclass
class TeacherConfig:
    """A teacher source (teachers/): ``_target_`` is its class (conf/teacher/*.yaml), ``path`` where it is."""

    _target_: str = "teachers.native.ExportTeacher"
    path: Optional[str] = None
    # the teacher's own layout on the mesh (strategy=mesh / expert_parallel); all null: the student's (`parallel`)
    parallel: TeacherParallelConfig = field(default_factory=TeacherParallelConfig)


@dataclass
class RunConfig:
    """What every app shares."""

    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    strategy: Any = "auto"  # conf/strategy/: a node with the strategy's name, or with `_target_` and arguments
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # the mesh of strategy=mesh / expert_parallel
    seed: int = 0
    stage: str = "pretrain"  # wandb job_type and the run's sub-directory
    out_dir: str = "."  # where checkpoints and the export go (defaults to the Hydra run dir)
    # "auto": continue from the newest readable checkpoint in <out_dir>/checkpoints when
    # there is one, else start fresh; "never" (or null): start fresh; or the path of a .ckpt file.
    resume: Optional[str] = RESUME_AUTO


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
    """``python -m distill.pipeline`` (``make run``): teacher -> baselines and students (`study`) -> report."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the teacher's architecture, when pretrained
    teacher_max_steps: Optional[int] = None  # None -> trainer.max_steps
    gen_tokens: int = 64  # new tokens per sequence when measuring generation speed
    gen_batch: int = 4
    # test-split perplexity and the own lm-eval task's accuracy for every model in the report (distill/evaluate);
    # off by default: it adds minutes to `make run` on a CPU
    evaluate: bool = False
    test_loss: bool = False  # the test-split loss of every model (all test blocks; implied by evaluate)
    study: StudyConfig = field(default_factory=StudyConfig)  # baselines and students (conf/study/, distill/study.py)
    stage: str = "pipeline"
    task: str = "lm"  # conf/task/: lm (this schema) or vl (VLPipelineConfig)


@dataclass
class VLPipelineConfig(RunConfig):
    """``python -m distill.pipeline task=vl``: VL-MoE teacher and dense baseline pretrained by masked data
    modeling -> VL Mixture-of-Students with staged KD and without KD -> frozen-MoE VQA and retrieval -> report."""

    data: VLDataConfig = field(default_factory=VLDataConfig)  # type: ignore[assignment]
    model: VLMoEConfig = field(default_factory=VLMoEConfig)  # the teacher's (and the dense baseline's) shape
    mask: MaskingConfig = field(default_factory=MaskingConfig)
    teacher: VLTeacherConfig = field(default_factory=VLTeacherConfig)
    student: VLStudentConfig = field(default_factory=VLStudentConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    teacher_max_steps: Optional[int] = None  # the teacher's and the dense baseline's steps; None -> trainer.max_steps
    stage: str = "pipeline"
    task: str = "vl"


@dataclass
class PlanSettings:
    """The `plan` node of ``python -m distill.plan``."""

    device_memory_gb: Optional[float] = None  # GiB per device; a layout whose largest rank needs more is refused


@dataclass
class PlanConfig:
    """``python -m distill.plan``: the model, the micro-batch (`data.batch_size` x `data.seq_len`), the world
    (`trainer.devices` x `trainer.num_nodes`), the layout (`parallel`) and the device's memory (`plan`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    plan: PlanSettings = field(default_factory=PlanSettings)


@dataclass
class EvaluateConfig:
    """``python -m distill.evaluate``: perplexity and lm-evaluation-harness tasks of ``eval.model``."""

    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    seed: int = 0
    stage: str = "evaluate"
    out_dir: str = "."


SCHEMAS: dict[str, type] = {"pretrain": PretrainConfig, "distill": DistillConfig, "pipeline": PipelineConfig,
                            "plan": PlanConfig, "teacher_targets": DistillConfig, "evaluate": EvaluateConfig}
# The pipeline's schema is a config group (conf/pipeline.yaml: `schema: pipeline`) that conf/task/vl.yaml overrides.
TASK_SCHEMAS: dict[str, type] = {"lm": PipelineConfig, "vl": VLPipelineConfig}


def schema_of(app: str, overrides: list[str] | None = None) -> type:
    """The schema an app's config is checked against: the pipeline's depends on `task=` (conf/task/)."""
    if app == "pipeline":
        tasks = [o.split("=", 1)[1] for o in overrides or [] if o.startswith("task=")]
        return TASK_SCHEMAS.get(tasks[-1] if tasks else "lm", PipelineConfig)
    return SCHEMAS[app]


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for app, schema in SCHEMAS.items():
        cs.store(name=f"{app}_schema", node=schema)
    cs.store(group="schema", name="pipeline", node=PipelineConfig, package="_global_")
    cs.store(group="schema", name="vl_pipeline", node=VLPipelineConfig, package="_global_")
