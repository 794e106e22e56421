"""`task=vl`: the composed config of the VL pipeline -> a `RunSpec` whose `vl` holds the VL settings, once.

The same rules as `distill.resolve.resolve`: keys the schema lacks are refused, each node becomes its
dataclass and is checked once, the students' KD schedules come from the `kd` group, and the student and the
dense baseline are derived from the teacher's shape here, before anything is built or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from distill.config import VLPipelineConfig
from distill.data.vl_config import VLDataConfig
from distill.errors import ConfigError
from distill.hydra_errors import check_known_keys
from distill.kd import KDSchedule
from distill.models.vl_config import VLMoEConfig
from distill.parallel.config import ParallelConfig
from distill.resolve import RunSpec, _node, _resume, kd_group, teacher_dtype
from distill.vl.config import DownstreamConfig, check_teacher_path, dense_baseline, derive_vl_student
from distill.vl.masking import MaskingConfig

# The VL pipeline's students: the KD group each one trains with (None: `kd` as configured).
VL_STUDENTS = {"student_staged_kd": None, "student_no_kd": "none"}


@dataclass
class VLSettings:
    masking: MaskingConfig
    student: VLMoEConfig  # the Mixture-of-Students (text vocabulary set from the tokenizer at build time)
    dense: VLMoEConfig  # the dense baseline of the teacher's active size
    downstream: DownstreamConfig
    teacher_path: Path | None  # an earlier run's teacher export; None: pretrain the teacher
    teacher_max_steps: int  # the teacher's and the dense baseline's steps
    students: dict[str, KDSchedule]


def _check_shapes(model: VLMoEConfig, data: VLDataConfig) -> None:
    """The model's input shapes are the data's (conf/task/vl.yaml interpolates them; an override may not)."""
    pairs = (("image_size", data.image_size, "data.image_size"),
             ("patch_size", data.image_tokenizer.patch_size, "data.image_tokenizer.patch_size"),
             ("max_text_len", data.max_text_len, "data.max_text_len"),
             ("visual_vocab_size", data.image_tokenizer.codebook_size, "data.image_tokenizer.codebook_size"))
    for key, want, source in pairs:
        if getattr(model, key) != want:
            raise ConfigError(f"model.{key}", f"is {getattr(model, key)} but {source} is {want}.",
                              f"leave model.{key} to follow {source} (conf/task/vl.yaml), or set both.")


def resolve_vl(cfg: DictConfig) -> RunSpec:
    """The run description of `python -m distill.pipeline task=vl`; ConfigError naming the first bad key."""
    check_known_keys(OmegaConf.to_container(cfg, resolve=False), VLPipelineConfig)
    trainer = _node(cfg, "trainer").validate()
    strategy = OmegaConf.to_container(cfg.strategy, resolve=True) if OmegaConf.is_config(cfg.strategy) \
        else {"name": cfg.strategy}
    if strategy.get("name", "mesh" if "_target_" in strategy else None) not in ("auto", "single_device") \
            or trainer.world_size != 1 or _node(cfg, "parallel") != ParallelConfig():
        raise ConfigError("strategy", "task=vl trains on one device for now (its model is not laid out by "
                          "distill.parallel yet).", "use strategy=auto, trainer.devices=1, trainer.num_nodes=1 and no parallel.* layout.")
    data: VLDataConfig = _node(cfg, "data").validate()
    model: VLMoEConfig = _node(cfg, "model").validate()
    _check_shapes(model, data)
    settings = VLSettings(
        masking=_node(cfg, "mask").validate(),
        student=derive_vl_student(model, _node(cfg, "student")),
        dense=dense_baseline(model),
        downstream=_node(cfg, "downstream").validate(),
        teacher_path=check_teacher_path(cfg.teacher.path),
        teacher_max_steps=_teacher_steps(cfg.teacher_max_steps, trainer.max_steps),
        students={name: kd_group(cfg.kd, group, trainer.max_steps) for name, group in VL_STUDENTS.items()},
    )
    return RunSpec(
        app="pipeline", stage=cfg.stage, out_dir=Path(cfg.out_dir), seed=cfg.seed,
        resume=_resume(cfg.resume, "pipeline"), data=data, trainer=trainer,  # type: ignore[arg-type]
        optim=_node(cfg, "optim").validate(), logger=_node(cfg, "logger").validate(),
        checkpoint=_node(cfg, "checkpoint").validate(), strategy=strategy,
        run_config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        teacher_dtype=teacher_dtype(trainer.precision), model=model, vl=settings,  # type: ignore[arg-type]
    )


def _teacher_steps(value: int | None, default: int) -> int:
    if value is not None and value < 1:
        raise ConfigError("teacher_max_steps", f"must be >= 1 or null, got {value}.",
                          "null: the teacher and the dense baseline train for trainer.max_steps.")
    return value or default
