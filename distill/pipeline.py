"""Hydra app behind `make run`: the whole recipe on one machine, then a report.

    teacher (pretrained, or teacher.path)  ->  student_staged_kd  (KD until kd.stop_*)
                                           ->  student_no_kd      (the same student, CE only)
                                           ->  student_full_kd    (KD all the way)
    -> report.md / report.json / val_loss.png in the run directory (and a wandb "report" run)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from distill.config import register_configs
from distill.distill import run_distill
from distill.errors import exit_on_config_error
from distill.evaluate import generation_tokens_per_s
from distill.pretrain import prepare_data, run_pretrain
from distill.report import markdown_table, write_report
from distill.runinfo import write_run_info
from distill.validation import run_app, validate_config
from distill.wandb_run import default_group, log_pipeline_report
from teachers.hf import load_hf_teacher_as_gpt, use_teacher_tokenizer

STUDENTS = {
    "student_staged_kd": None,  # kd as configured (conf/kd/staged.yaml: stop at 70% of the steps)
    "student_no_kd": {"stop_step": 0, "stop_fraction": None},
    "student_full_kd": {"stop_step": None, "stop_fraction": None, "decay": "none"},
}


def stage_config(cfg: DictConfig, stage: str, **updates: Any) -> DictConfig:
    c = cfg.copy()
    OmegaConf.update(c, "stage", stage)
    for key, value in updates.items():
        OmegaConf.update(c, key, value, merge=False)
    return c


def run_pipeline(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    if cfg.logger.group is None:  # every stage of this pipeline in one wandb group
        cfg = stage_config(cfg, cfg.stage, **{"logger.group": default_group(f"pipeline-{out_dir.name}")})
    cfg = use_teacher_tokenizer(cfg)  # teacher=hf: the teacher's tokenizer is the data's
    dm = prepare_data(cfg)
    write_run_info(out_dir, cfg, data=dm)
    from distill.data import format_stats

    print(format_stats(dm.stats()), flush=True)

    models: dict[str, dict[str, Any]] = {}
    if cfg.teacher.path is None:
        steps = cfg.teacher_max_steps or cfg.trainer.max_steps
        t = run_pretrain(stage_config(cfg, "teacher", **{"trainer.max_steps": steps}), out_dir / "teacher", dm)
        teacher_path = t["export_dir"]
    else:
        teacher_path, t = cfg.teacher.path, {}
    if cfg.teacher.kind == "hf":  # converted to our GPT: generation timed the way the students' is
        teacher = load_hf_teacher_as_gpt(teacher_path)
    else:
        from teachers.native import load_native_teacher

        teacher, _ = load_native_teacher(teacher_path)
    t["gen_tokens_per_s"] = generation_tokens_per_s(teacher, dm.vocab_size, cfg.gen_tokens, cfg.gen_batch)
    models["teacher"] = t
    del teacher

    curves: dict[str, list[tuple[int, float]]] = {}
    for name, kd_update in STUDENTS.items():
        updates = {"teacher.path": teacher_path}
        if kd_update is not None:
            updates.update({f"kd.{k}": v for k, v in kd_update.items()})
        s = run_distill(stage_config(cfg, name, **updates), out_dir / name, dm)
        model = s.pop("model")
        s["gen_tokens_per_s"] = generation_tokens_per_s(model, dm.vocab_size, cfg.gen_tokens, cfg.gen_batch)
        curves[name] = s.pop("val_history")
        models[name] = s

    staged, no_kd = models["student_staged_kd"]["val_loss"], models["student_no_kd"]["val_loss"]
    notes = [
        f"staged KD {'beat' if staged < no_kd else 'did not beat'} no KD: val loss {staged:.4f} vs {no_kd:.4f}.",
        f"KD stopped at step {models['student_staged_kd'].get('kd_stop_step')} of {cfg.trainer.max_steps}.",
    ]
    if rank_zero_only.rank != 0:  # under DDP every rank runs the stages; one writes the report
        return models
    stop = models["student_staged_kd"].get("kd_stop_step")
    paths = write_report(out_dir, models, curves, notes, {"KD stop (staged)": stop} if stop else None)
    log_pipeline_report(cfg, out_dir, models, paths)
    print("\n" + markdown_table(models) + "\n" + "\n".join(notes) + f"\nreport: {paths['md']}", flush=True)
    return models


register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="pipeline")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    validate_config(cfg, "pipeline")
    run_pipeline(cfg, Path(cfg.out_dir))


if __name__ == "__main__":
    run_app(main, "pipeline")
