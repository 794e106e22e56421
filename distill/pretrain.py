"""Hydra app: pretrain a teacher on the LM objective.

    python -m distill.pretrain model=tiny data=stdlib trainer.max_steps=300

Writes Lightning checkpoints (``checkpoints/``), an export directory (``export/``: safetensors + model
config + tokenizer) that a teacher can later be loaded from by path alone, and the stage's logs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from distill.config import register_configs
from distill.data import LMDataModule
from distill.errors import exit_on_config_error
from distill.export import export_model
from distill.models import ModelConfig
from distill.modules import LMModule
from distill.training import build_trainer, finish_logger, make_logger, resolved_dict


def prepare_data(cfg: Any) -> LMDataModule:
    """Build (or load from cache) corpus, tokenizer and packed blocks."""
    dm = LMDataModule(OmegaConf.to_object(cfg.data) if OmegaConf.is_config(cfg.data) else cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def model_config_for(cfg_model: Any, vocab_size: int) -> ModelConfig:
    """The model config as a dataclass, with the vocabulary taken from the tokenizer."""
    mc = OmegaConf.to_object(cfg_model) if OmegaConf.is_config(cfg_model) else cfg_model
    return replace(mc, vocab_size=vocab_size)


def resume_path(resume: str | None, out_dir: Path) -> str | None:
    if resume is None:
        return None
    if resume == "last":
        last = out_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    return resume


def final_metrics(trainer: L.Trainer, module: LMModule, dm: LMDataModule) -> dict[str, float]:
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    return {
        "val_loss": float(metrics["val/loss"]),
        "val_ppl": float(metrics["val/ppl"]),
        "train_tokens_per_s": float(module.train_tokens_per_s),
    }


def run_pretrain(cfg: Any, out_dir: Path, dm: LMDataModule | None = None) -> dict[str, Any]:
    """Train, validate, export. Returns the stage's summary (also used by the pipeline's report)."""
    L.seed_everything(cfg.seed, workers=True)
    dm = dm or prepare_data(cfg)
    model_cfg = model_config_for(cfg.model, dm.vocab_size)
    module = LMModule(model_cfg, cfg.optim, cfg.trainer.max_steps)
    logger = make_logger(cfg.logger, out_dir, cfg.stage, resolved_dict(cfg))
    trainer = build_trainer(cfg, out_dir, logger)
    trainer.fit(module, datamodule=dm, ckpt_path=resume_path(cfg.resume, out_dir))
    summary = final_metrics(trainer, module, dm)
    summary.update(
        params_total=module.model.num_params(),
        params_active=module.model.num_active_params(),
        export_dir=str(out_dir / "export"),
    )
    if trainer.is_global_zero:
        export_model(module.model, model_cfg, out_dir / "export", tokenizer=dm.tokenizer,
                     meta={"stage": cfg.stage, "data_fingerprint": dm.fingerprint, **summary})
    finish_logger(logger)
    return summary


register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="pretrain")
@exit_on_config_error
def main(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    summary = run_pretrain(cfg, out_dir)
    print(
        f"[pretrain] val loss {summary['val_loss']:.4f}  val ppl {summary['val_ppl']:.2f}  "
        f"train {summary['train_tokens_per_s']:.0f} tok/s  export -> {summary['export_dir']}"
    )
    return summary


if __name__ == "__main__":
    main()
