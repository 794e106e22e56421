"""Hydra app: distil a Mixture-of-Students from a teacher with staged KD.

    python -m distill.distill teacher.path=outputs/.../export kd=staged student.depth_ratio=0.875

The student is derived from the teacher's architecture (`student` config), trained with
``ce_weight * CE + w * KD + aux`` until the KD stop step and ``CE + aux`` after it, when the teacher
is released. Checkpoints record the teacher's path and content hash. With ``resume=auto`` (the default) a
run started again in the same directory continues exactly where its last readable checkpoint left off.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from distill.config import register_configs
from distill.errors import exit_on_config_error
from distill.hydra_errors import run_app
from distill.resolve import resolve

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="distill")
@exit_on_config_error  # a submitit job (run without run_app) also exits 2 with one line
def main(cfg: DictConfig) -> None:
    spec = resolve(cfg, "distill")  # every check, before Lightning and the data libraries load
    from distill.stage import distill_stage, run_stage, say

    summary, _ = run_stage(spec, distill_stage(spec))
    say(f"[distill] val loss {summary['val_loss']:.4f}  val ppl {summary['val_ppl']:.2f}  "
        f"KD stopped at step {summary['kd_stop_step']}  teacher calls {summary['teacher_calls']}  "
        f"export -> {summary['export_dir']}")


if __name__ == "__main__":
    run_app(main, "distill")
