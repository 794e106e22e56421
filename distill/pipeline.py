"""Hydra app behind `make run`: the whole recipe on one machine, then a report (`task=vl`: the VL-MoE
pipeline of distill/vl/pipeline.py instead).

    teacher (pretrained, or teacher.path)  ->  baselines of the study (pretrained like the teacher; compared)
                                           ->  the study's students, e.g. (study=default, `make run`):
                                               student_staged_kd  (kd as configured: KD until kd.stop_*)
                                               student_no_kd      (kd=none: the same student, CE only)
                                               student_full_kd    (kd=full: KD all the way)
    -> report.md / report.json / val_loss.png in the run directory (and a wandb "report" run)

The study (`study` node, conf/study/, distill/study.py) is resolved by distill/resolve.py, every student's
schedule and architecture before the first stage runs.
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
    from distill.evaluate import generation_speeds
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
    evaluate = settings.evaluate and rank_zero_only.rank == 0
    batch = dm.cfg.eval_batch_size or dm.cfg.batch_size

    def speeds(trained: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Generation speed of the models together, their runs interleaved (a warm-up each, then the median of 5
        runs and their spread): a slow spell of the machine slows them alike, so equal architectures measure
        alike."""
        g = generation_speeds(trained, dm.vocab_size, settings.gen_tokens, settings.gen_batch)
        return {n: {"gen_tokens_per_s": r["median"], "gen_tokens_per_s_spread": r["spread"]} for n, r in g.items()}

    def figures(model: Any, name: str) -> dict[str, Any]:
        """With evaluate=true test perplexity + the own lm-eval task (distill/evaluate/pipeline_eval.py), else with
        test_loss=true the test perplexity alone."""
        out: dict[str, Any] = {}
        if evaluate:
            from distill.evaluate.pipeline_eval import evaluate_for_report

            out.update(evaluate_for_report(model, name, dm, out_dir, batch))
        elif settings.test_loss:
            from distill.evaluate.perplexity import perplexity

            ppl = perplexity(model, dm.blocks["test"], batch, next(model.parameters()).device)
            out.update(test_loss=ppl["loss"], test_ppl=ppl["ppl"])
        return out

    model = teacher.as_gpt()
    t.update({**figures(model, "teacher"), **speeds({"teacher": model})["teacher"]})
    models["teacher"] = t
    del model
    trained: dict[str, Any] = {}  # the baselines and students: their generation speed is measured together
    curves: dict[str, list[tuple[int, float]]] = {}
    for name, arch in spec.baselines.items():  # pretrained for the teacher's steps, compared in the report
        b_spec = spec.stage_spec(name, out_dir / name, model=arch,
                                 trainer=replace(spec.trainer, max_steps=settings.teacher_max_steps))
        b, module = run_stage(b_spec, pretrain_stage(b_spec), dm)
        curves[name] = b.pop("val_history")
        models[name] = {**b, **figures(module.model, name)}
        trained[name] = module.model
        del module

    for name, plan in spec.students.items():
        s_spec = spec.stage_spec(name, out_dir / name, teacher=teacher, kd=plan.schedule, student=plan.model,
                                 student_init=plan.init)
        s, module = run_stage(s_spec, distill_stage(s_spec), dm)
        curves[name] = s.pop("val_history")
        models[name] = {**s, **figures(module.model, name)}
        trained[name] = module.model
        del module
    for name, g in speeds(trained).items():
        models[name].update(g)
    del trained

    notes = pipeline_notes(models, spec)
    if rank_zero_only.rank != 0:  # under DDP every rank runs the stages; one writes the report
        return models
    stops = {f"KD stop ({n})": m["kd_stop_step"] for n, m in models.items()
             if m.get("kd_stop_step") and m["kd_stop_step"] < spec.trainer.max_steps}  # marked when only one
    paths = write_report(out_dir, models, curves, notes, stops if len(stops) == 1 else None)
    log_pipeline_report(spec.logger, spec.run_config, out_dir, models, paths)
    print("\n" + markdown_table(models) + "\n" + "\n".join(notes) + f"\nreport: {paths['md']}", flush=True)
    return models


def pipeline_notes(models: dict[str, dict[str, Any]], spec: RunSpec) -> list[str]:
    """The report's sentences: how each KD student did against the same student without KD (a student whose
    schedule never runs KD and whose architecture and init are the same), and where KD stopped."""
    notes = []
    plans = spec.students
    for name, plan in plans.items():
        if not plan.schedule.uses_teacher or "val_loss" not in models.get(name, {}):
            continue
        ref = next((n for n, p in plans.items() if not p.schedule.uses_teacher and p.model == plan.model
                    and p.init == plan.init and "val_loss" in models.get(n, {})), None)
        stop = plan.schedule.stop_step
        when = "KD all the way" if stop is None or stop >= spec.trainer.max_steps else f"KD stopped at step {stop} of {spec.trainer.max_steps}"
        if ref is None:
            notes.append(f"{name}: {when}, val loss {models[name]['val_loss']:.4f}.")
            continue
        a, b = models[name]["val_loss"], models[ref]["val_loss"]
        notes.append(f"{name} ({when}) {'beat' if a < b else 'did not beat'} {ref}: val loss {a:.4f} vs {b:.4f}.")
    return notes


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
