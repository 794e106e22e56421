"""`losses.jsonl` (rank 0): one line per training batch, ``{"step", "batch", "loss", "ce", "kd", "aux", "z"}``
and, when the run has them, the internal KD terms ``"router_kd"``, ``"hidden_kd"`` (a row holds the terms
its step logged; readers must not assume the optional ones). ``step`` is the 0-based optimizer step the
batch belongs to. A resumed run first drops the lines of the steps it is about to run again, so the file
always holds one history.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

import lightning as L

LOSSES = "losses.jsonl"
LOSS_TERMS = ("loss", "ce", "kd", "aux", "z", "router_kd", "hidden_kd")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
