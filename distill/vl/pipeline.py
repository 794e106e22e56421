"""`python -m distill.pipeline task=vl`: the VL-MoE recipe on one machine, then a report.

    data (scenes + text BPE + k-means visual tokens)
      -> teacher            VL-MoE, masked data modeling (MLM, block-wise MIM, masked image-text), aux loss
      -> dense              the teacher's shape with dense FFNs: the same active parameters per token
      -> student_staged_kd  fewer layers, the same pools; KD on the masked predictions until kd.stop_*
      -> student_no_kd      the same student, masked data modeling only
      -> each model: VQA and image-text retrieval fine-tuned with every router and expert frozen
      -> report.md / report.json / val_loss.png / downstream.png (and a wandb "report" run)

Every stage is `distill.stage.run_stage` (checkpoints, resume, loggers, export) with a `VLModule`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from distill.errors import ConfigError
from distill.export import WEIGHTS, file_sha256
from distill.models.vl_config import VLMoEConfig
from distill.resolve import RunSpec
from distill.stage import Stage, run_stage, say
from distill.vl.export import load_vl_export, read_vl_config

COLUMNS = ("params_total", "params_active", "params_token", "val_mlm", "val_mim", "val_vl", "vqa_acc", "i2t_r1", "i2t_r5",
           "t2i_r1", "t2i_r5", "train_tokens_per_s")
HEADERS = ("model", "params (total)", "params (active)", "params/token", "val MLM", "val MIM", "val image-text", "VQA acc",
           "i2t R@1", "i2t R@5", "t2i R@1", "t2i R@5", "train tok/s")


def vl_stage(spec: RunSpec, model_cfg: VLMoEConfig, teacher_dir: Path | None = None) -> Stage:
    """One VL stage: masked data modeling of ``model_cfg``, with staged KD from ``teacher_dir`` when
    ``spec.kd`` is set (a schedule whose stop step is 0 never loads the teacher)."""
    from distill.vl.module import VLModule

    ref = None
    if spec.kd is not None and teacher_dir is not None:
        ref = {"path": str(teacher_dir), "sha256": file_sha256(teacher_dir / WEIGHTS)}

    def build(dm: Any) -> VLModule:
        cfg = replace(model_cfg, text_vocab_size=dm.vocab_size)
        loader = (lambda: load_vl_export(teacher_dir)) if ref is not None else None
        return VLModule(cfg, spec.optim, spec.vl.masking, spec.trainer.max_steps,
                        special={"pad": dm.pad_id, "cls": dm.cls_id, "mask": dm.mask_id},
                        schedule=spec.kd, teacher_loader=loader, teacher=ref, seed=spec.seed)

    return Stage(build=build, teacher=ref)


def check_teacher_matches(teacher_dir: Path, dm: Any) -> None:
    """A given teacher must have been trained on this data's vocabularies and shapes."""
    cfg = read_vl_config(teacher_dir)
    for key, want in (("text_vocab_size", dm.vocab_size), ("visual_vocab_size", dm.visual_vocab_size),
                      ("image_size", dm.image_size), ("patch_size", dm.patch_size)):
        if getattr(cfg, key) != want:
            raise ConfigError("teacher.path", f"the teacher at {teacher_dir} has {key}={getattr(cfg, key)}, this "
                              f"run's data gives {want}.", "use the data settings the teacher was trained with.")


def downstream(model: Any, dm: Any, spec: RunSpec) -> dict[str, Any]:
    """VQA (when the data has questions) and retrieval, each fine-tuned on a copy with the MoE frozen."""
    from distill.vl.downstream import finetune_retrieval, finetune_vqa

    cfg, row = spec.vl.downstream, {}
    if cfg.vqa_steps and dm.num_answers:
        row.update(finetune_vqa(model, dm.vqa_set("train"), dm.vqa_set("test"), dm.num_answers, cfg))
    if cfg.retrieval_steps:
        row.update(finetune_retrieval(model, dm.retrieval_set("train"), dm.retrieval_set("test"), cfg))
    return row


def _notes(models: dict[str, dict[str, Any]]) -> list[str]:
    def cmp(a: str, b: str, key: str, higher: bool) -> str | None:
        x, y = models.get(a, {}).get(key), models.get(b, {}).get(key)
        if x is None or y is None:
            return None
        better = x > y if higher else x < y
        return f"{a} {'beat' if better else 'did not beat'} {b} on {key}: {x:.4f} vs {y:.4f}."

    pairs = [("teacher", "dense", "val_loss", False), ("teacher", "dense", "vqa_acc", True),
             ("teacher", "dense", "i2t_r1", True), ("student_staged_kd", "student_no_kd", "val_loss", False),
             ("student_staged_kd", "student_no_kd", "vqa_acc", True),
             ("student_staged_kd", "student_no_kd", "i2t_r1", True)]
    notes = [n for n in (cmp(*p) for p in pairs) if n]
    frozen = [name for name, row in models.items() if row.get("frozen_ok") is False]
    notes.append("every router and expert stayed unchanged in every fine-tuning." if not frozen else
                 f"routers or experts changed while fine-tuning {', '.join(frozen)}!")
    return notes


def write_vl_report(out_dir: Path, models: dict[str, dict[str, Any]], curves: dict[str, list[tuple[int, float]]],
                    tuning: dict[str, list[tuple[int, float]]], notes: list[str], stop: int | None,
                    seconds: float) -> dict[str, Path]:
    """report.md, report.json, val_loss.png and downstream.png in ``out_dir``."""
    import json

    from distill.report import markdown_table, plot_curves

    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_curves(curves, out_dir / "val_loss.png", "VL-MoE: masked data modeling, validation loss",
                      {"KD stop (staged)": stop} if stop else None)
    tune_png = plot_curves(tuning, out_dir / "downstream.png", "Fine-tuning with the MoE frozen (train loss)",
                           ylabel="training loss")
    (out_dir / "report.json").write_text(json.dumps(
        {"models": models, "val_curves": curves, "downstream_curves": tuning, "notes": notes, "seconds": seconds},
        indent=2, default=float))
    md = ["# distill report: VL-MoE", "", markdown_table(models, COLUMNS, HEADERS), "",
          "params (active): every non-expert parameter plus one pool's top-k experts per MoE block (the paper's "
          "count); params/token: one token's path (one FFN branch per block), equal for the MoE and dense models.",
          "Validation losses are masked-token cross-entropies (nats) on the same masks for every model; recall is "
          "among the held-out pairs (image-to-text: every held-out caption and distractor caption).", ""]
    md += [f"- {n}" for n in notes] + [f"- the whole pipeline took {seconds / 60:.1f} min.", "",
                                       f"![validation loss]({png.name})", "", f"![fine-tuning]({tune_png.name})", ""]
    (out_dir / "report.md").write_text("\n".join(md))
    return {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": png, "downstream_png": tune_png}


def run_vl_pipeline(spec: RunSpec) -> dict[str, dict[str, Any]]:
    """Run every stage and the downstream tasks; write and return the report's rows."""
    from lightning.pytorch.utilities import rank_zero_only

    from distill.report import markdown_table
    from distill.runinfo import write_run_info
    from distill.tracking import default_group
    from distill.tracking.report import log_report
    from distill.vl.data import VLDataModule

    start = time.perf_counter()
    vl, out_dir = spec.vl, spec.out_dir
    if spec.logger.group is None:  # every stage of this pipeline in one wandb group
        spec = replace(spec, logger=replace(spec.logger, group=default_group(f"vl-pipeline-{out_dir.name}")))
    dm = VLDataModule(spec.data, seed=spec.seed)
    dm.prepare_data()
    dm.setup("fit")
    write_run_info(out_dir, spec.run_config, data=dm)
    say(dm.summary())

    models: dict[str, dict[str, Any]] = {}
    nets: dict[str, Any] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    pretrain = replace(spec.trainer, max_steps=vl.teacher_max_steps)
    teacher_dir = vl.teacher_path
    if teacher_dir is None:
        stages = [("teacher", spec.model), ("dense", vl.dense)]
    else:
        check_teacher_matches(teacher_dir, dm)
        nets["teacher"] = load_vl_export(teacher_dir)
        models["teacher"] = {"params_total": nets["teacher"].num_params(), "export_dir": str(teacher_dir),
                             "params_active": nets["teacher"].num_active_params()}
        stages = [("dense", vl.dense)]
    for name, cfg in stages:
        s_spec = spec.stage_spec(name, out_dir / name, trainer=pretrain, model=cfg)
        row, module = run_stage(s_spec, vl_stage(s_spec, cfg), dm)
        curves[name], models[name], nets[name] = row.pop("val_history"), row, module.model
        if name == "teacher":
            teacher_dir = Path(row["export_dir"])
    for name, schedule in vl.students.items():
        s_spec = spec.stage_spec(name, out_dir / name, kd=schedule, model=vl.student)
        row, module = run_stage(s_spec, vl_stage(s_spec, vl.student, teacher_dir), dm)
        curves[name], models[name], nets[name] = row.pop("val_history"), row, module.model

    tuning: dict[str, list[tuple[int, float]]] = {}
    for name, net in nets.items():
        models[name]["params_token"] = net.num_token_params()
        say(f"downstream: {name}")
        row = downstream(net.eval(), dm, spec)
        for key in ("vqa_curve", "retrieval_curve"):
            if key in row:
                tuning[f"{name} {key.split('_')[0]}"] = row.pop(key)
        models[name].update(row)
    if rank_zero_only.rank != 0:
        return models
    seconds = time.perf_counter() - start
    notes = _notes(models)
    stop = models.get("student_staged_kd", {}).get("kd_stop_step")
    paths = write_vl_report(out_dir, models, curves, tuning, notes, stop, seconds)
    log_report(spec.logger, out_dir, job_type="report", name="report",
               table=(["model", *COLUMNS], [[n, *[r.get(k) for k in COLUMNS]] for n, r in models.items()]),
               images={"val_loss": paths["png"], "downstream": paths["downstream_png"]},
               summary={f"{n}/{k}": r.get(k) for n, r in models.items() for k in ("val_loss", "vqa_acc", "i2t_r1")},
               config=dict(spec.run_config))
    print("\n" + markdown_table(models, COLUMNS, HEADERS) + "\n" + "\n".join(notes) +
          f"\ntook {seconds / 60:.1f} min; report: {paths['md']}", flush=True)
    return models
