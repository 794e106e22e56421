"""The one stage runner shared by pretraining and distillation.

    data -> module -> (resume or initialise) -> logger -> trainer -> run_info.json -> fit -> final metrics
         -> export -> barrier -> summary.json / wandb run closed

`run_stage` takes a `RunSpec` (distill/resolve.py) and a `Stage` saying how to build this stage's module;
`pretrain_stage` and `distill_stage` are the two kinds. Every decision about the teacher is the teacher
source's (teachers/base.py): this file never asks which kind it is.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from distill.data import LMDataModule
from distill.data.resumable import ResumableDataModule
from distill.errors import NonFiniteError
from distill.export import export_model
from distill.kd.targets import ensure_targets
from distill.parallel.parallelize import is_parallelized
from distill.resolve import RunSpec
from distill.runinfo import write_run_info
from distill.tracking import finish_stage_logger, make_stage_logger
from distill.train.distill_module import DistillModule
from distill.train.lm_module import LMModule
from distill.train.resume import CHECKPOINT_DIR, latest_good_checkpoint, resolve_resume
from distill.train.trainer import build_trainer
from students.mos import init_student_from_teacher
from teachers.base import TeacherLoader


@dataclass
class Stage:
    """How one stage differs from another: its module, what to do before a fresh start, what it reports."""

    build: Callable[[LMDataModule], LMModule]
    init_fresh: Callable[[LMModule, LMDataModule], None] | None = None  # only when the stage does not resume
    teacher: dict[str, str] | None = None  # {path, sha256}: run_info.json and the export's metadata
    extra_callbacks: list = field(default_factory=list)


@rank_zero_only
def say(line: str) -> None:
    """Print a stage's one-line summary once: every rank ran the stage, rank 0 speaks."""
    print(line, flush=True)


def prepare_data(spec: RunSpec) -> LMDataModule:
    """Build (or load from cache) corpus, tokenizer and packed blocks; the train loader resumes mid-epoch."""
    dm = ResumableDataModule(spec.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def calibration_batches(dm: LMDataModule, n: int) -> list[torch.Tensor]:
    """The first ``n`` batches of training inputs, read from the packed blocks (the train loader's resumable
    position is left alone): the calibration data of expert selection."""
    size = dm.cfg.batch_size
    ids = torch.as_tensor(dm.blocks["train"][: n * size]["input_ids"])[:, :-1]
    return list(ids.split(size))


def pretrain_stage(spec: RunSpec) -> Stage:
    """LM training of ``spec.model`` (its vocabulary is the tokenizer's)."""
    assert spec.model is not None
    return Stage(build=lambda dm: LMModule(replace(spec.model, vocab_size=dm.vocab_size), spec.optim,
                                           spec.trainer.max_steps))


def distill_stage(spec: RunSpec) -> Stage:
    """Staged KD of ``spec.student`` from ``spec.teacher`` with the schedule ``spec.kd``."""
    teacher, schedule = spec.teacher, spec.kd
    assert teacher is not None and schedule is not None and spec.student is not None
    ref = teacher.identity().as_dict()

    def build(dm: LMDataModule) -> LMModule:
        teacher.check_vocab(dm.tokenizer)
        k = schedule.cfg
        if schedule.uses_teacher and k.teacher_targets == "offline":  # computed once, shared through the cache
            with torch.random.fork_rng():  # building the teacher draws from the RNG: the student's init must not see it
                targets, path, _ = ensure_targets(dm, teacher.as_gpt, ref["sha256"], k=k.topk, temperature=k.temperature,
                                               batch_size=dm.cfg.batch_size, value_dtype=k.targets_dtype,
                                               router_topk=k.router_topk)
            dm.attach_targets(targets, path)
        student = replace(spec.student, vocab_size=dm.vocab_size)
        # the module drops the loader when the schedule never runs KD (KDSchedule.uses_teacher)
        # a mesh strategy lays the teacher out on its own layout (TeacherLoader.sharded), reading only its slices
        loader = TeacherLoader(teacher, spec.teacher_dtype, internals=k.router_weight > 0 or k.hidden_weight > 0)
        return DistillModule(student, spec.optim, schedule, teacher_loader=loader, teacher=ref)

    def init_from_teacher(module: LMModule, dm: LMDataModule) -> None:
        # A local of this function: the teacher is unreachable (and freed) once the copy is done, before fit.
        s = spec.student_init
        shape = module.model_cfg
        if s.expert_selection != "first":  # every teacher expert, to choose from (students/experts.py)
            experts = teacher.architecture().num_experts
            shape = replace(shape, num_experts=list(experts[len(experts) - len(shape.num_experts):]))
        source_model = teacher.student_init_model(shape)
        kept: dict[int, list[int]] = {}
        mapping = init_student_from_teacher(module.model, source_model, s,
                                            calibration_batches(dm, s.calibration_batches), kept)
        if isinstance(module, DistillModule):  # router / hidden-state KD pair what the student started from
            moe_blocks = [i for i in range(module.model_cfg.n_layers) if module.model_cfg.is_moe_block(i)]
            module.expert_maps = {moe_blocks.index(si): experts for si, experts in kept.items()} or None
            module.teacher_layers = mapping
        del source_model
        gc.collect()

    init = init_from_teacher if spec.student_init is not None and spec.student_init.init == "teacher" else None
    return Stage(build=build, init_fresh=init, teacher=ref)


def _fit(trainer: L.Trainer, module: LMModule, dm: LMDataModule, ckpt_path: str | None, out_dir: Path) -> None:
    """`trainer.fit`; a NaN/Inf stop names the checkpoint a fixed run can continue from."""
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except NonFiniteError as err:
        kept = latest_good_checkpoint(out_dir / CHECKPOINT_DIR)
        where = f"the last checkpoint, {kept}, is intact" if kept else "no checkpoint had been written yet"
        raise NonFiniteError(f"{err} {where[0].upper()}{where[1:]}; fix the cause (e.g. lower optim.lr) and start "
                             "again with resume=auto.") from None


def run_stage(spec: RunSpec, stage: Stage, dm: LMDataModule | None = None) -> tuple[dict[str, Any], LMModule]:
    """Train one stage, validate, export. Returns its summary (the pipeline's report uses it) and the module."""
    out_dir = spec.out_dir
    L.seed_everything(spec.seed, workers=True)
    dm = dm or prepare_data(spec)
    module = stage.build(dm)
    resumed = resolve_resume(spec.resume, out_dir)
    ckpt_path = str(resumed) if resumed is not None else None
    if ckpt_path is None and stage.init_fresh is not None:
        stage.init_fresh(module, dm)
    logger = make_stage_logger(spec.logger, out_dir, spec.stage, spec.run_config)
    trainer, throughput = build_trainer(spec.trainer, spec.checkpoint, spec.strategy, out_dir, logger,
                                        stage.extra_callbacks)
    write_run_info(out_dir, spec.run_config, data=dm, teacher=stage.teacher,
                   resumed_from=ckpt_path)
    _fit(trainer, module, dm, ckpt_path, out_dir)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    summary: dict[str, Any] = {
        "val_loss": float(metrics["val/loss"]),
        "val_ppl": float(metrics["val/ppl"]),
        "train_tokens_per_s": float(throughput.tokens_per_s),
        "params_total": module.model.num_params(),
        "params_active": module.model.num_active_params(),
        "params_experts": expert_params(module.model),
        **module.stage_figures(),
    }
    summary["export_dir"] = str(out_dir / "export")
    sharded = is_parallelized(module.model)  # every rank gathers each tensor in turn, rank 0 writes it
    if trainer.is_global_zero or sharded:
        meta = {"stage": spec.stage, "data_fingerprint": dm.fingerprint}
        # a student's export names its teacher; a pretrained model's records its own figures
        meta.update({"teacher": stage.teacher} if stage.teacher else summary)
        export_model(module.model, module.model_cfg, out_dir / "export", tokenizer=dm.tokenizer, meta=meta,
                     writer=trainer.is_global_zero)
    trainer.strategy.barrier("export")  # other ranks (and later stages) read the export only once it exists
    finish_stage_logger(logger, summary)
    summary["val_history"] = module.val_history
    return summary, module


def expert_params(model: torch.nn.Module) -> int:
    """The routed experts' parameters of every MoE layer (all experts, also those held on other ranks)."""
    from distill.moe import MoELayer

    return sum(m.num_experts * sum(p.numel() for p in m.experts.parameters()) // m.experts.num_local_experts
               for m in model.modules() if isinstance(m, MoELayer))
