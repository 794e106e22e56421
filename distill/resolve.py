"""The composed Hydra config -> one typed, validated run description (`RunSpec`), once per run.

Everything below the apps takes the dataclasses of a `RunSpec` and never parses config. `resolve` is the
only place that reads the composed config: it rejects keys the schema does not have, builds each node's
dataclass and runs its checks once, instantiates the teacher source, derives the student, builds the KD
schedule(s), and checks the strategy's layout (docs/architecture.md, "How a value travels").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from distill.config import (
    RESUME_AUTO,
    RESUME_FRESH,
    SCHEMAS,
    CheckpointConfig,
    LoggerConfig,
    OptimConfig,
    TrainerConfig,
)
from distill.data.config import DataConfig
from distill.errors import ConfigError
from distill.hydra_errors import CONF_DIR, check_known_keys
from distill.kd import KDConfig, KDSchedule
from distill.layout import resolve_strategy
from distill.models.config import ModelConfig
from distill.study import StudentPlan, resolve_study
from students.config import StudentConfig
from students.mos import derive_student
from teachers.base import TeacherSource


@dataclass
class PipelineSettings:
    teacher_max_steps: int  # the pretrained teacher's budget
    gen_tokens: int
    gen_batch: int
    evaluate: bool = False  # test perplexity + the own lm-eval task per model (distill/evaluate/pipeline_eval.py)
    test_loss: bool = False  # test perplexity per model (implied by evaluate)


@dataclass
class RunSpec:
    """What one run (or one stage of the pipeline) needs, typed and validated."""

    app: str  # pretrain | distill | pipeline | teacher_targets
    stage: str  # wandb job_type and the stage's sub-directory
    out_dir: Path
    seed: int
    resume: str | None  # "auto", a checkpoint path, or None (start fresh)
    data: DataConfig
    trainer: TrainerConfig
    optim: OptimConfig
    logger: LoggerConfig
    checkpoint: CheckpointConfig
    strategy: dict[str, Any]  # a strategy name or a `_target_` node (checked), built by the trainer
    run_config: dict[str, Any]  # the composed config as plain data (wandb, run_info.json)
    model: ModelConfig | None = None  # pretrain, pipeline: the model trained on the LM objective
    teacher: TeacherSource | None = None
    teacher_dtype: torch.dtype = torch.float32
    student: ModelConfig | None = None  # derived from the teacher's architecture
    student_init: StudentConfig | None = None
    kd: KDSchedule | None = None
    students: dict[str, StudentPlan] = field(default_factory=dict)  # pipeline: the study's students
    baselines: dict[str, ModelConfig] = field(default_factory=dict)  # pipeline: models pretrained beside the teacher
    pipeline: PipelineSettings | None = None
    vl: Any = None  # task=vl: distill.vl.resolve.VLSettings (data is then a VLDataConfig, model a VLMoEConfig)

    def stage_spec(self, stage: str, out_dir: Path, **changes: Any) -> RunSpec:
        """This spec for one stage of the pipeline; ``run_config`` (what wandb and run_info.json show) says
        what the stage changed."""
        config = {**self.run_config, "stage": stage}
        for key, value in changes.items():
            if isinstance(value, KDSchedule):
                config["kd"] = dataclasses.asdict(value.cfg)
            elif isinstance(value, TeacherSource):
                config["teacher"] = {**config.get("teacher", {}), "path": value.identity().path}
            elif dataclasses.is_dataclass(value):  # the `student` node is the student's init; its architecture aside
                config[{"student_init": "student", "student": "student_arch"}.get(key, key)] = dataclasses.asdict(value)
        return replace(self, stage=stage, out_dir=out_dir, run_config=config, **changes)


def teacher_dtype(precision: str) -> torch.dtype:
    """The frozen teacher's dtype for a Lightning precision: bf16-* -> bfloat16, 16-* -> float16, else float32."""
    p = str(precision)
    return torch.bfloat16 if p.startswith("bf16") else torch.float16 if p.startswith("16") else torch.float32


def _node(cfg: DictConfig, key: str) -> Any:
    """The dataclass of a config node (OmegaConf runs the dataclass's own ``__post_init__`` checks)."""
    return OmegaConf.to_object(cfg[key])


def _resume(resume: str | None, app: str) -> str | None:
    if resume is None or str(resume).lower() in RESUME_FRESH:
        return None
    if resume == RESUME_AUTO:
        return RESUME_AUTO
    if app == "pipeline":
        raise ConfigError("resume", f"the pipeline runs several stages; one checkpoint path ({resume}) cannot "
                          "resume them all.", "use resume=auto (each stage continues from its own checkpoints) "
                          "or resume=never.")
    if not Path(resume).expanduser().exists():
        raise ConfigError("resume", f"no checkpoint at {resume}.",
                          "use resume=auto (<out_dir>/checkpoints/last.ckpt when it exists), resume=never, "
                          "or the path of a checkpoint (a .ckpt file, or a sharded .ckpt directory).")
    return str(resume)


def kd_group(kd: DictConfig, group: str | None, max_steps: int) -> KDSchedule:
    """The KD schedule of config group ``kd=<group>`` (conf/kd/<group>.yaml) over the run's ``kd`` node."""
    node = kd if group is None else OmegaConf.merge(kd, OmegaConf.load(CONF_DIR / "kd" / f"{group}.yaml"))
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, KDConfig)
    return KDSchedule(cfg, max_steps)


def instantiate_teacher(node: DictConfig) -> TeacherSource:
    """The teacher source of the `teacher` node (its ``_target_`` with ``path``)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    node = OmegaConf.masked_copy(node, [k for k in node if k != "parallel"])  # the layout is the strategy's
    try:
        source = instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise ConfigError("teacher._target_", f"cannot build the teacher source {node.get('_target_')!r} "
                          f"({str(err).splitlines()[0]}).", "select one of conf/teacher/ (native, checkpoint, hf).") from None
    if not isinstance(source, TeacherSource):
        raise ConfigError("teacher._target_", f"{node.get('_target_')!r} is not a teacher source.",
                          "select one of conf/teacher/ (native, checkpoint, hf).")
    return source


def resolve(cfg: DictConfig, app: str) -> RunSpec:
    """The run description of the composed config of ``app``; ConfigError naming the first bad key."""
    check_known_keys(OmegaConf.to_container(cfg, resolve=False), SCHEMAS[app])
    trainer: TrainerConfig = _node(cfg, "trainer").validate()
    spec = RunSpec(
        app=app, stage=cfg.stage, out_dir=Path(cfg.out_dir), seed=cfg.seed, resume=_resume(cfg.resume, app),
        data=_node(cfg, "data").validate(), trainer=trainer, optim=_node(cfg, "optim").validate(),
        logger=_node(cfg, "logger").validate(), checkpoint=_node(cfg, "checkpoint").validate(),
        strategy={}, run_config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        teacher_dtype=teacher_dtype(trainer.precision),
    )
    architectures: list[ModelConfig] = []
    teacher_arch: ModelConfig | None = None
    if app in ("pretrain", "pipeline"):
        spec.model = _node(cfg, "model").validate()
        architectures.append(spec.model)
    if app in ("distill", "pipeline", "teacher_targets"):
        if app != "pipeline":
            spec.kd = kd_group(cfg.kd, None, trainer.max_steps)
        if app != "pipeline" or cfg.teacher.path is not None:
            spec.teacher = instantiate_teacher(cfg.teacher)
            teacher_arch = spec.teacher.architecture()
            architectures.insert(0, teacher_arch)  # its config first: the rest builds on it
            spec.teacher.verify()
            spec.data = replace(spec.data, tokenizer=spec.teacher.data_tokenizer(spec.data.tokenizer))
        spec.student_init = _node(cfg, "student").validate()
        spec.student = derive_student(architectures[0], spec.student_init)  # depth, experts, top_k vs experts
        architectures.append(spec.student)
        if app == "pipeline":  # the study's students and baselines (distill/study.py, conf/study/)
            spec.students, spec.baselines = resolve_study(cfg.study, cfg.kd, spec.student_init, architectures[0],
                                                          trainer.max_steps, kd_group)
            architectures += [p.model for p in spec.students.values()] + list(spec.baselines.values())
    if app == "pipeline":
        spec.pipeline = _pipeline_settings(cfg, trainer)
    teacher_parallel = _node(cfg, "teacher").parallel.layout() if "teacher" in cfg else None
    spec.strategy = resolve_strategy(OmegaConf.to_container(cfg.strategy, resolve=True)  # type: ignore[arg-type]
                                     if OmegaConf.is_config(cfg.strategy) else {"name": cfg.strategy},
                                     trainer.world_size, [a for a in architectures if a is not teacher_arch],
                                     _node(cfg, "parallel"), teacher_parallel,
                                     teacher_arch or (spec.model if app == "pipeline" else None),
                                     trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0
                                     else None)
    return spec


def _pipeline_settings(cfg: DictConfig, trainer: TrainerConfig) -> PipelineSettings:
    if cfg.teacher_max_steps is not None and cfg.teacher_max_steps < 1:
        raise ConfigError("teacher_max_steps", f"must be >= 1 or null, got {cfg.teacher_max_steps}.",
                          "null: the teacher trains for trainer.max_steps.")
    for key in ("gen_tokens", "gen_batch"):
        if cfg[key] < 1:
            raise ConfigError(key, f"must be >= 1, got {cfg[key]}.", f"e.g. {key}=4.")
    return PipelineSettings(cfg.teacher_max_steps or trainer.max_steps, cfg.gen_tokens, cfg.gen_batch,
                            evaluate=bool(cfg.get("evaluate", False)), test_loss=bool(cfg.get("test_loss", False)))

