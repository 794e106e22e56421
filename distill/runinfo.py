"""What a run directory records about the run: `run_info.json` and the per-step losses (`losses.jsonl`).

`run_info.json` (rank 0, each stage's out_dir, rewritten at each start): the resolved config, the git
commit of the code (and whether the tree had local changes), package versions, the corpus, tokenizer and
teacher fingerprints, the checkpoint the run resumed from, and the earlier starts in the same directory
(a requeued or resumed job keeps its history).

`losses.jsonl` (rank 0): one line per training batch, ``{"step", "batch", "loss", "ce", "kd", "aux", "z"}``
(``step`` is the 0-based optimizer step the batch belongs to). A resumed run first drops the lines of
the steps it is about to run again, so the file always holds one history.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf

RUN_INFO = "run_info.json"
LOSSES = "losses.jsonl"
PACKAGES = ("distill", "torch", "lightning", "hydra-core", "omegaconf", "datasets", "tokenizers", "transformers",
            "safetensors", "numpy", "wandb")
LOSS_TERMS = ("loss", "ce", "kd", "aux", "z")


def git_state(path: Path | None = None) -> dict[str, Any]:
    """{"commit", "dirty"} of the git checkout holding ``path`` (this package by default); None outside one."""
    root = path or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def data_fingerprints(dm: Any) -> dict[str, Any]:
    """The corpus, tokenizer and packed-data fingerprints of a set-up `LMDataModule`."""
    from distill.data import corpus_fingerprint

    return {
        "fingerprint": dm.fingerprint,
        "corpus": corpus_fingerprint(dm.corpus) if dm.corpus is not None else None,
        "tokenizer": dm.tokenizer.fingerprint if dm.tokenizer is not None else None,
        "vocab_size": dm.vocab_size,
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@rank_zero_only
def write_run_info(out_dir: str | os.PathLike, cfg: Any, *, data: Any = None, teacher: dict[str, str] | None = None,
                   resumed_from: str | os.PathLike | None = None) -> Path:
    """Write ``<out_dir>/run_info.json`` (rank 0) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_INFO
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    git = git_state()
    attempts: list[dict[str, Any]] = []
    if path.is_file():
        try:
            attempts = list(json.loads(path.read_text()).get("attempts", []))
        except (OSError, ValueError):
            attempts = []
    attempts.append({"started": started, "resumed_from": str(resumed_from) if resumed_from else None,
                     "git_commit": git["commit"], "host": socket.gethostname()})
    config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    info = {
        "stage": config.get("stage") if isinstance(config, dict) else None,
        "started": started,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "command": [sys.executable, *sys.argv],
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "git": git,
        "packages": package_versions(),
        "data": data_fingerprints(data) if data is not None else None,
        "teacher": teacher,
        "config": config,
        "attempts": attempts,
    }
    _write_atomic(path, json.dumps(info, indent=2, sort_keys=False, default=str) + "\n")
    return path


class StepLossRecorder(L.Callback):
    """Rank 0 writes each training batch's loss terms to ``path`` (JSON lines, flushed per line)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: TextIO | None = None
        self._step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        kept = [row for row in read_loss_rows(self.path) if row["step"] < trainer.global_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self._file = open(self.path, "a")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._file is None:
            return
        metrics = trainer.callback_metrics
        row: dict[str, Any] = {"step": self._step, "batch": batch_idx}
        row.update({k: float(metrics[f"train/{k}"]) for k in LOSS_TERMS if f"train/{k}" in metrics})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()


def read_loss_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a `losses.jsonl` (a line cut short by a kill is skipped)."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows
