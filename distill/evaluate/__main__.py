"""Hydra app: evaluate an exported model or a checkpoint (README, "Evaluate").

    python -m distill.evaluate eval.model=outputs/<date>/<time>/export
    python -m distill.evaluate eval.model=<run>/student_staged_kd/export eval.tasks=[distill_continuation,piqa] eval.limit=200
    python -m distill.evaluate eval.model=<run>/checkpoints/last.ckpt eval.tasks=[paper] eval.perplexity=[]

Bad input (a missing model or tokenizer, an unknown lm-eval task) stops the run before any work: one line
naming the config key, exit status 2.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from distill.config import register_configs
from distill.errors import exit_on_config_error
from distill.hydra_errors import run_app

register_configs()


@hydra.main(version_base=None, config_path="../../conf", config_name="evaluate")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    from distill.evaluate.app import resolve_evaluate, run_evaluate

    run_evaluate(resolve_evaluate(cfg))


if __name__ == "__main__":
    run_app(main, "evaluate")
