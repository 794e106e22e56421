"""Hydra app: pretrain a teacher on the LM objective.

    python -m distill.pretrain model=tiny data=stdlib trainer.max_steps=300

Writes Lightning checkpoints (``checkpoints/``), an export directory (``export/``: safetensors + model
config + tokenizer) that a teacher can later be loaded from by path alone, ``run_info.json``,
``losses.jsonl`` and the stage's logs. With ``resume=auto`` (the default) a run started again in the same
directory continues exactly where its last readable checkpoint left off.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from distill.config import register_configs
from distill.errors import exit_on_config_error
from distill.hydra_errors import run_app
from distill.resolve import resolve

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="pretrain")
@exit_on_config_error  # a submitit job (run without run_app) also exits 2 with one line
def main(cfg: DictConfig) -> dict[str, Any]:
    spec = resolve(cfg, "pretrain")  # every check, before Lightning and the data libraries load
    from distill.stage import pretrain_stage, run_stage, say

    summary, _ = run_stage(spec, pretrain_stage(spec))
    say(f"[pretrain] val loss {summary['val_loss']:.4f}  val ppl {summary['val_ppl']:.2f}  "
        f"train {summary['train_tokens_per_s']:.0f} tok/s  export -> {summary['export_dir']}")
    return summary


if __name__ == "__main__":
    run_app(main, "pretrain")
