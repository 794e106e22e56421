"""Hydra app: pretrain a teacher on the LM objective.

    python -m distill.pretrain model=tiny data=stdlib trainer.max_steps=300

Writes Lightning checkpoints (``checkpoints/``), an export directory (``export/``: safetensors + model
config + tokenizer) that a teacher can later be loaded from by path alone, ``run_info.json``,
``losses.jsonl`` and the stage's logs. With ``resume=auto`` (the default) a run started again in the same
directory continues exactly where its last readable checkpoint left off.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from distill.checkpointing import (
    CHECKPOINT_DIR,
    NonFiniteError,
    ResumableDataModule,
    latest_good_checkpoint,
    resolve_resume,
)
from distill.config import register_configs
from distill.data import LMDataModule
from distill.errors import exit_on_config_error
from distill.export import export_model
from distill.models import ModelConfig
from distill.modules import LMModule
from distill.runinfo import write_run_info
from distill.training import build_trainer, finish_logger, make_logger, resolved_dict
from distill.validation import run_app, validate_config


def prepare_data(cfg: Any) -> LMDataModule:
    """Build (or load from cache) corpus, tokenizer and packed blocks; the train loader resumes mid-epoch."""
    dm = ResumableDataModule(OmegaConf.to_object(cfg.data) if OmegaConf.is_config(cfg.data) else cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def model_config_for(cfg_model: Any, vocab_size: int) -> ModelConfig:
    """The model config as a dataclass, with the vocabulary taken from the tokenizer."""
    mc = OmegaConf.to_object(cfg_model) if OmegaConf.is_config(cfg_model) else cfg_model
    return replace(mc, vocab_size=vocab_size)


def resume_path(resume: str | None, out_dir: Path) -> str | None:
    """The checkpoint ``resume`` (auto / never / a path) points to, as `Trainer.fit`'s ckpt_path."""
    path = resolve_resume(resume, out_dir)
    return str(path) if path is not None else None


def fit(trainer: L.Trainer, module: LMModule, dm: LMDataModule, ckpt_path: str | None, out_dir: Path) -> None:
    """`trainer.fit`; a NaN/Inf stop names the checkpoint a fixed run can continue from."""
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except NonFiniteError as err:
        kept = latest_good_checkpoint(out_dir / CHECKPOINT_DIR)
        where = f"the last checkpoint, {kept}, is intact" if kept else "no checkpoint had been written yet"
        raise NonFiniteError(f"{err} {where[0].upper()}{where[1:]}; fix the cause (e.g. lower optim.lr) and start "
                             "again with resume=auto.") from None


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
    ckpt_path = resume_path(cfg.resume, out_dir)
    logger = make_logger(cfg.logger, out_dir, cfg.stage, resolved_dict(cfg))
    trainer = build_trainer(cfg, out_dir, logger)
    write_run_info(out_dir, cfg, data=dm, resumed_from=ckpt_path)
    fit(trainer, module, dm, ckpt_path, out_dir)
    summary = final_metrics(trainer, module, dm)
    summary.update(
        params_total=module.model.num_params(),
        params_active=module.model.num_active_params(),
        export_dir=str(out_dir / "export"),
    )
    if trainer.is_global_zero:
        export_model(module.model, model_cfg, out_dir / "export", tokenizer=dm.tokenizer,
                     meta={"stage": cfg.stage, "data_fingerprint": dm.fingerprint, **summary})
    trainer.strategy.barrier("export")  # other ranks (and later stages) read the export only once it exists
    finish_logger(logger, summary)
    return summary


register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="pretrain")
@exit_on_config_error
def main(cfg: DictConfig) -> dict[str, Any]:
    validate_config(cfg, "pretrain")
    out_dir = Path(cfg.out_dir)
    summary = run_pretrain(cfg, out_dir)
    print(
        f"[pretrain] val loss {summary['val_loss']:.4f}  val ppl {summary['val_ppl']:.2f}  "
        f"train {summary['train_tokens_per_s']:.0f} tok/s  export -> {summary['export_dir']}"
    )
    return summary


if __name__ == "__main__":
    run_app(main, "pretrain")
