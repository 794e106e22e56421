"""The `study` node of the pipeline: which models one `python -m distill.pipeline` job trains and compares.

    teacher (the `model` node, pretrained)  ->  baselines   (the teacher's architecture with some keys changed,
                                                              pretrained for the teacher's steps; compared, not
                                                              distilled from)
                                             ->  students    (each: a KD group and KD keys over the run's `kd`
                                                              node, student keys over the run's `student` node)

`conf/study/default.yaml` is the `make run` study (staged KD, no KD, KD all the way); `conf/study/paper_claims.yaml`
the DeepSpeed-MoE paper's claims (conf/sweep/paper_claims.yaml runs it over seeds; distill/claims.py reads the
results). Resolved once, by distill/resolve.py, into `StudentPlan`s and baseline `ModelConfig`s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

from distill.errors import ConfigError
from distill.kd import KDConfig, KDSchedule
from distill.models.config import ModelConfig
from students.config import StudentConfig
from students.mos import derive_student

STAGE_NAME = r"^[a-z][a-z0-9_]*$"  # stage names are directory and wandb job-type names


@dataclass
class StudyStudent:
    """One student: ``kd_group`` (conf/kd/<group>.yaml over the run's `kd` node; null: `kd` as configured),
    then the `kd` keys given here; the `student` keys given here over the run's `student` node."""

    kd_group: Optional[str] = None
    kd: Dict[str, Any] = field(default_factory=dict)
    student: Dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyConfig:
    """The `study` node (conf/study/): baselines {name: model keys changed}, students {name: StudyStudent}, and
    which claims the sweep report checks (``paper``: distill/claims.py; null: none)."""

    baselines: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # {name: StudyStudent's keys}: plain mappings, so a student can be added from the command line
    # (`+study.students.x={kd_group: none}`); checked against StudyStudent by `resolve_study`
    students: Dict[str, Any] = field(default_factory=dict)
    claims: Optional[str] = None


@dataclass
class StudentPlan:
    """A resolved student of the study: its schedule, architecture (vocabulary set by the data) and init."""

    schedule: KDSchedule
    model: ModelConfig
    init: StudentConfig


def _check_name(name: str, key: str) -> None:
    if not re.match(STAGE_NAME, name) or name == "teacher":
        raise ConfigError(key, f"{name!r} is not a usable stage name (lowercase letters, digits and _; not "
                               "'teacher').", "rename it, e.g. student_kd50.")


def _merged(base: Any, changes: dict[str, Any], key: str) -> DictConfig:
    """``base`` (a dataclass or a config node) with ``changes`` merged; an unknown key names ``key``."""
    node = OmegaConf.structured(base) if dataclasses.is_dataclass(base) else base
    try:
        return OmegaConf.merge(node, changes)  # type: ignore[return-value]
    except Exception as err:  # omegaconf's ValidationError / ConfigKeyError: name the study's key
        raise ConfigError(key, str(err).splitlines()[0], "use keys of the node it changes.") from None


@contextlib.contextmanager
def _study_keys(prefix: str, node: str, changes: Mapping[str, Any]) -> Iterator[None]:
    """A ConfigError about a key of `node` (kd / student / model) whose value the study set is renamed to the study's
    key (`prefix`.<key>), so that it names what to fix; a value that came from the run's own node keeps its key."""
    try:
        yield
    except ConfigError as err:
        key, value = err.key.removeprefix(node + "."), changes
        for part in key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                raise
            value = value[part]
        raise ConfigError(f"{prefix}.{key}", err.problem, err.fix) from None


def resolve_study(study: DictConfig, kd: DictConfig, student: StudentConfig, teacher: ModelConfig,
                  max_steps: int, kd_group: Any) -> tuple[dict[str, StudentPlan], dict[str, ModelConfig]]:
    """The study's students (each with its schedule, architecture derived from ``teacher`` and init) and
    baselines (the teacher's architecture with the given keys changed, validated); `kd_group(kd, group,
    max_steps)` is resolve's loader of conf/kd/ groups."""
    cfg: StudyConfig = OmegaConf.to_object(study)  # type: ignore[assignment]
    if not cfg.students:
        raise ConfigError("study.students", "the study has no student.", "select a study, e.g. study=default.")
    plans: dict[str, StudentPlan] = {}
    for name, entry in cfg.students.items():
        _check_name(name, f"study.students.{name}")
        s = OmegaConf.to_object(_merged(StudyStudent(), entry or {}, f"study.students.{name}"))
        assert isinstance(s, StudyStudent)
        group = kd_group(kd, s.kd_group, max_steps).cfg  # conf/kd/<group>.yaml over the run's kd node
        with _study_keys(f"study.students.{name}.kd", "kd", s.kd):
            kd_cfg = OmegaConf.to_object(_merged(group, s.kd, f"study.students.{name}.kd"))
            assert isinstance(kd_cfg, KDConfig)
            schedule = KDSchedule(kd_cfg, max_steps)
        with _study_keys(f"study.students.{name}.student", "student", s.student):
            init = OmegaConf.to_object(_merged(student, s.student, f"study.students.{name}.student"))
            assert isinstance(init, StudentConfig)
            init = init.validate()
            plans[name] = StudentPlan(schedule, derive_student(teacher, init), init)
    baselines: dict[str, ModelConfig] = {}
    for name, changes in cfg.baselines.items():
        _check_name(name, f"study.baselines.{name}")
        if name in plans:
            raise ConfigError(f"study.baselines.{name}", "is also the name of a student.", "rename one of them.")
        node = _merged(teacher, dict(changes), f"study.baselines.{name}")
        with _study_keys(f"study.baselines.{name}", "model", changes):
            baselines[name] = ModelConfig.from_dict(OmegaConf.to_container(node)).validate()  # type: ignore[arg-type]
    return plans, baselines
