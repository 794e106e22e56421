"""One rank of a 2-process `distill` run with ``student.init=teacher`` (tests/test_teacher_sources.py).

    python tests/init_teacher_worker.py TEACHER_EXPORT OUT_DIR   (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_* set)

The run is the real one (`resolve` -> `distill_stage` -> `run_stage`, DDP on gloo); the only addition is
a weak reference to the teacher model the student is initialised from, and a callback that records at
the start of `fit` whether that model is still alive. Each rank writes OUT_DIR/rank{R}.json.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import weakref
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from distill.config import register_configs
from distill.resolve import resolve
from distill.stage import distill_stage, run_stage

ROOT = Path(__file__).resolve().parents[1]


def main(teacher: str, out: Path) -> None:
    rank = int(os.environ["RANK"])
    register_configs()
    overrides = ["data.max_documents=60", "data.seq_len=16", "data.tokenizer.kind=bytes", "data.batch_size=4",
                 f"teacher.path={teacher}", "student.init=teacher", "student.n_layers=2", "trainer=smoke",
                 "trainer.max_steps=1", "trainer.devices=2", "trainer.accelerator=cpu", "strategy=ddp",
                 "strategy.start_method=popen", "logger=none", f"out_dir={out / 'run'}", "kd=none"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="distill", overrides=overrides)
    spec = resolve(cfg, "distill")
    refs: list[weakref.ref] = []
    source = spec.teacher
    load = source.student_init_model

    def tracked(student):  # the model the stage copies from, watched through a weak reference only
        model = load(student)
        refs.append(weakref.ref(model))
        return model

    source.student_init_model = tracked  # type: ignore[method-assign]
    facts: dict = {}

    class AtFitStart(L.Callback):
        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            gc.collect()
            facts["alive_at_fit_start"] = [r() is not None for r in refs]
            teacher_model = source.load()  # an independent load: the copied block must equal it
            facts["copied_equal"] = bool(torch.equal(pl_module.model.blocks[-1].ffn.experts.w_in,
                                                     teacher_model.blocks[-1].ffn.experts.w_in))

    stage = distill_stage(spec)
    stage.extra_callbacks.append(AtFitStart())
    run_stage(spec, stage)
    facts["initialised_from"] = len(refs)
    (out / f"rank{rank}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
