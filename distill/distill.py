"""Hydra app: distil a Mixture-of-Students from a teacher with staged KD.

    python -m distill.distill teacher.path=outputs/.../export kd=staged student.depth_ratio=0.875

The student is derived from the teacher's architecture (`student` config), trained with
``ce_weight * CE + w * KD + aux`` until the KD stop step and ``CE + aux`` after it, when the teacher
is released. Checkpoints record the teacher's path and content hash. With ``resume=auto`` (the default) a
run started again in the same directory continues exactly where its last readable checkpoint left off.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from distill.config import register_configs
from distill.data import LMDataModule
from distill.errors import exit_on_config_error
from distill.export import export_model
from distill.kd import KDSchedule
from distill.models import ModelConfig
from distill.modules import DistillModule
from distill.pretrain import final_metrics, fit, prepare_data, resume_path
from distill.runinfo import write_run_info
from distill.training import build_trainer, finish_logger, make_logger, resolved_dict
from distill.validation import check_teacher_vocab, run_app, teacher_architecture, validate_config
from students.mos import derive_student, init_student_from_teacher
from teachers.hf import hf_teacher_source, use_teacher_tokenizer
from teachers.native import load_native_teacher, teacher_ref


def _obj(node: Any) -> Any:
    return OmegaConf.to_object(node) if OmegaConf.is_config(node) else node


def teacher_source(cfg: Any) -> tuple[ModelConfig, Any, dict[str, str] | None]:
    """(teacher architecture, a zero-argument loader, {path, sha256}) for the configured teacher.

    Only the architecture is read here; the weights are loaded by the loader, when a step needs them.
    """
    t = cfg.teacher
    if t.kind == "hf" and t.path is not None:  # a Hugging Face checkpoint (teachers/hf.py)
        return hf_teacher_source(cfg)
    teacher_cfg = teacher_architecture(t)  # ConfigError: no path, unknown kind, nothing at the path
    ref = teacher_ref(t.path)
    loader = partial(lambda p: load_native_teacher(p)[0], t.path)
    return teacher_cfg, loader, {"path": ref.path, "sha256": ref.sha256}


def run_distill(cfg: Any, out_dir: Path, dm: LMDataModule | None = None) -> dict[str, Any]:
    """Train one student. Returns the stage summary (also used by the pipeline's report)."""
    L.seed_everything(cfg.seed, workers=True)
    cfg = use_teacher_tokenizer(cfg)  # teacher=hf: the teacher's tokenizer is the data's
    dm = dm or prepare_data(cfg)
    teacher_cfg, loader, ref = teacher_source(cfg)
    check_teacher_vocab(cfg.teacher.path, teacher_cfg, dm.tokenizer)
    student_cfg = derive_student(teacher_cfg, _obj(cfg.student), vocab_size=dm.vocab_size)
    kd = _obj(cfg.kd)
    schedule = KDSchedule(kd, cfg.trainer.max_steps)  # validates kd.* against trainer.max_steps
    module = DistillModule(student_cfg, cfg.optim, cfg.trainer.max_steps, kd,
                           teacher_loader=loader if schedule.stop_step != 0 else None, teacher=ref)
    ckpt_path = resume_path(cfg.resume, out_dir)
    if cfg.student.init == "teacher" and ckpt_path is None:
        teacher = loader()
        if cfg.teacher.kind == "hf":  # converted to our layout, shaped like the student
            teacher = teacher.as_gpt(student_cfg)
        init_student_from_teacher(module.model, teacher, _obj(cfg.student))
    logger = make_logger(cfg.logger, out_dir, cfg.stage, resolved_dict(cfg))
    trainer = build_trainer(cfg, out_dir, logger)
    write_run_info(out_dir, cfg, data=dm, teacher=ref, resumed_from=ckpt_path)
    fit(trainer, module, dm, ckpt_path, out_dir)
    summary = final_metrics(trainer, module, dm)
    summary.update(
        params_total=module.model.num_params(),
        params_active=module.model.num_active_params(),
        kd_stop_step=schedule.stop_step,
        teacher_calls=module.teacher_calls,
        val_history=module.val_history,
        export_dir=str(out_dir / "export"),
    )
    if trainer.is_global_zero:
        export_model(module.model, student_cfg, out_dir / "export", tokenizer=dm.tokenizer,
                     meta={"stage": cfg.stage, "teacher": ref, "data_fingerprint": dm.fingerprint})
    trainer.strategy.barrier("export")
    finish_logger(logger, {k: v for k, v in summary.items() if k != "val_history"})
    summary["model"] = module.model
    return summary


register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="distill")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    validate_config(cfg, "distill")
    summary = run_distill(cfg, Path(cfg.out_dir))
    print(
        f"[distill] val loss {summary['val_loss']:.4f}  val ppl {summary['val_ppl']:.2f}  "
        f"KD stopped at step {summary['kd_stop_step']}  teacher calls {summary['teacher_calls']}  "
        f"export -> {summary['export_dir']}"
    )


if __name__ == "__main__":
    run_app(main, "distill")
