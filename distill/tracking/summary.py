"""A stage's ``summary.json`` (validation history, final metrics, best val loss) and the loggers that keep it.

Every logged metric also goes into the stage's :class:`StageSummary`, rewritten after each validation
(``status``: running) and at the end (finished, see `distill.tracking.loggers.finish_stage_logger`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from distill.tracking.files import json_value, scalar, write_atomic

SUMMARY_FILE = "summary.json"
# wandb summaries (define_metric): the best validation loss is its minimum, the rest their final value.
SUMMARIES = {"val/loss": "min,last", "val/ppl": "last,min", "train/loss": "last", "val/kl_teacher": "last",
             "val/top1_agree": "last"}
# summary.json keys of the metrics the sweep report shows (logged name -> key).
SUMMARY_KEYS = {"val/loss": "val_loss", "val/ppl": "val_ppl", "train/loss": "train_loss",
                "val/kl_teacher": "val_kl_teacher", "val/top1_agree": "val_top1_agree",
                "perf/tokens_per_s": "train_tokens_per_s"}


class StageSummary:
    """The stage's metrics as ``summary.json``: last value of each metric, validation history, best val loss.

    A requeued run starts again from a checkpoint: the history it carries over is the part logged before
    the step where this process starts, so ``best_val_loss`` covers the whole run, not only this attempt.
    """

    def __init__(self, out_dir: Path, stage: str, run_id: str | None):
        self.path = Path(out_dir) / SUMMARY_FILE
        self.stage, self.run_id = stage, run_id
        self.last: dict[str, float] = {}
        self.val_history: list[tuple[int, float]] = []
        self.first_step: int | None = None
        self.last_step: int | None = None
        self._previous: list[tuple[int, float]] = []
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
                self._previous = [(int(s), float(v)) for s, v in old.get("val_history", [])]
            except (ValueError, TypeError):
                self._previous = []

    def update(self, metrics: Mapping[str, Any], step: int | None) -> bool:
        """Record one ``log_metrics`` call; True when it held validation metrics."""
        if step is not None:
            self.first_step = step if self.first_step is None else self.first_step
            self.last_step = step if self.last_step is None else max(self.last_step, step)
        for key, value in metrics.items():
            v = scalar(value)
            if v is not None:
                self.last[key] = v
        if "val/loss" in self.last and "val/loss" in metrics and step is not None:
            loss = self.last["val/loss"]
            self.val_history = [(s, x) for s, x in self.val_history if s != step] + [(step, loss)]
            return True
        return False

    def history(self) -> list[tuple[int, float]]:
        start = self.first_step if self.first_step is not None else math.inf
        kept = [(s, v) for s, v in self._previous if s < start]
        return sorted(kept + self.val_history)

    def as_dict(self, status: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        history = self.history()
        finite = [v for _, v in history if math.isfinite(v)]
        out: dict[str, Any] = {"stage": self.stage, "status": status, "wandb_id": self.run_id,
                               "step": self.last_step, "first_step": self.first_step}
        out.update({key: self.last.get(name) for name, key in SUMMARY_KEYS.items() if name in self.last})
        out["best_val_loss"] = min(finite) if finite else None
        for key, value in (extra or {}).items():  # the app's own numbers (parameter counts, ...) win
            if key not in ("stage", "status") and (isinstance(value, (bool, int, float, str)) or value is None):
                out[key] = value
        out["val_history"] = [list(p) for p in history]
        out["metrics"] = dict(sorted(self.last.items()))
        return json_value(out)

    def write(self, status: str, extra: Mapping[str, Any] | None = None) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.as_dict(status, extra), indent=2) + "\n")
        return self.path


class SummarisedMixin:
    """Mixin: every logged metric also goes into the stage's :class:`StageSummary`."""

    summary: StageSummary

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.summary.update(metrics, step):
            self.summary.write("running")
        super().log_metrics(metrics, step)  # type: ignore[misc]


class StageWandbLogger(SummarisedMixin, WandbLogger):
    """WandbLogger that defines the summary metrics when its run starts."""

    def __init__(self, summary: StageSummary, **kwargs: Any):
        super().__init__(**kwargs)
        self.summary = summary

    @property
    def experiment(self) -> Any:
        fresh = self._experiment is None
        run = super().experiment
        if fresh and rank_zero_only.rank == 0 and self._experiment is not None:
            for name, summary in SUMMARIES.items():
                run.define_metric(name, summary=summary)
        return run


class StageCSVLogger(SummarisedMixin, CSVLogger):
    def __init__(self, summary: StageSummary, **kwargs: Any):
        super().__init__(**kwargs)
        self.summary = summary


class SummaryOnlyLogger(Logger):
    """``logger.kind=none``: nothing is logged anywhere, but the stage still writes its summary.json."""

    def __init__(self, summary: StageSummary):
        super().__init__()
        self.summary = summary

    @property
    def name(self) -> str:
        return "summary"

    @property
    def version(self) -> str:
        return ""

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.summary.update(metrics, step):
            self.summary.write("running")
