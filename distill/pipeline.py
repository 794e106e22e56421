"""Hydra app behind `make run`: the whole recipe on one machine, then a report (`task=vl`: the VL-MoE
pipeline of distill/vl/pipeline.py instead).

    teacher (pretrained, or teacher.path)  ->  student_staged_kd  (kd as configured: KD until kd.stop_*)
                                           ->  student_no_kd      (kd=none: the same student, CE only)
                                           ->  student_full_kd    (kd=full: KD all the way)
    -> report.md / report.json / val_loss.png in the run directory (and a wandb "report" run)

Each student's KD schedule is built by distill/resolve.py from the config group it names
(`PIPELINE_STUDENTS`), all before the first stage runs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import hydra
from omegaconf import DictConfig

from distill.config import register_configs
from distill.errors import exit_on_config_error
from distill.hydra_errors import run_app
from distill.resolve import RunSpec, resolve
from teachers.native import ExportTeacher


def run_pipeline(spec: RunSpec) -> dict[str, Any]:
    # Imported here: the configuration is resolved (and a bad value reported) before these libraries load.
    from lightning.pytorch.utilities import rank_zero_only

    from distill.data import format_stats
    from distill.evaluate import generation_tokens_per_s
    from distill.report import markdown_table, write_report
    from distill.runinfo import write_run_info
    from distill.stage import distill_stage, prepare_data, pretrain_stage, run_stage
    from distill.tracking import default_group, log_pipeline_report

    assert spec.pipeline is not None
    out_dir, settings = spec.out_dir, spec.pipeline
    if spec.logger.group is None:  # every stage of this pipeline in one wandb group
        spec = replace(spec, logger=replace(spec.logger, group=default_group(f"pipeline-{out_dir.name}")))
    dm = prepare_data(spec)
    write_run_info(out_dir, spec.run_config, data=dm)
    print(format_stats(dm.stats()), flush=True)

    models: dict[str, dict[str, Any]] = {}
    teacher = spec.teacher
    if teacher is None:  # pretrain it first: the pipeline's own teacher is an export of this project
        t_spec = spec.stage_spec("teacher", out_dir / "teacher",
                                 trainer=replace(spec.trainer, max_steps=settings.teacher_max_steps))
        t, _ = run_stage(t_spec, pretrain_stage(t_spec), dm)
        t.pop("val_history")
        teacher = ExportTeacher(t["export_dir"])
    else:
        t = {}
    model = teacher.as_gpt()
    t["gen_tokens_per_s"] = generation_tokens_per_s(model, dm.vocab_size, settings.gen_tokens, settings.gen_batch)
    evaluate = settings.evaluate and rank_zero_only.rank == 0
    if evaluate:  # evaluate=true: test perplexity and the own lm-eval task (distill/evaluate/pipeline_eval.py)
        from distill.evaluate.pipeline_eval import evaluate_for_report

        t.update(evaluate_for_report(model, "teacher", dm, out_dir, dm.cfg.eval_batch_size or dm.cfg.batch_size))
    models["teacher"] = t
    del model

    curves: dict[str, list[tuple[int, float]]] = {}
    for name, schedule in spec.students.items():
        s_spec = spec.stage_spec(name, out_dir / name, teacher=teacher, kd=schedule)
        s, module = run_stage(s_spec, distill_stage(s_spec), dm)
        s["gen_tokens_per_s"] = generation_tokens_per_s(module.model, dm.vocab_size, settings.gen_tokens,
                                                        settings.gen_batch)
        curves[name] = s.pop("val_history")
        if evaluate:
            s.update(evaluate_for_report(module.model, name, dm, out_dir, dm.cfg.eval_batch_size or dm.cfg.batch_size))
        models[name] = s
        del module

    staged, no_kd = models["student_staged_kd"]["val_loss"], models["student_no_kd"]["val_loss"]
    notes = [
        f"staged KD {'beat' if staged < no_kd else 'did not beat'} no KD: val loss {staged:.4f} vs {no_kd:.4f}.",
        f"KD stopped at step {models['student_staged_kd'].get('kd_stop_step')} of {spec.trainer.max_steps}.",
    ]
    if rank_zero_only.rank != 0:  # under DDP every rank runs the stages; one writes the report
        return models
    stop = models["student_staged_kd"].get("kd_stop_step")
    paths = write_report(out_dir, models, curves, notes, {"KD stop (staged)": stop} if stop else None)
    log_pipeline_report(spec.logger, spec.run_config, out_dir, models, paths)
    print("\n" + markdown_table(models) + "\n" + "\n".join(notes) + f"\nreport: {paths['md']}", flush=True)
    return models


register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="pipeline")
@exit_on_config_error  # a submitit job (run without run_app) also exits 2 with one line
def main(cfg: DictConfig) -> None:
    if cfg.task == "vl":  # conf/task/vl.yaml: the VL-MoE pipeline, its own schema and settings
        from distill.vl.pipeline import run_vl_pipeline
        from distill.vl.resolve import resolve_vl

        run_vl_pipeline(resolve_vl(cfg))
    else:
        run_pipeline(resolve(cfg, "pipeline"))


if __name__ == "__main__":
    run_app(main, "pipeline")
