"""`Throughput`: training tokens per second, as the report states it.

Lightning's `ThroughputMonitor` logs rates over a sliding window of batches and keeps no whole-run
average; the report needs the average over all timed steps with the first steps (warm-up) and the time
spent in validation left out, and the token count across resumes. So this small callback stays.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class Throughput(L.Callback):
    """Logs ``perf/tokens_per_s`` per step and ``perf/tokens_seen``; ``tokens_per_s`` is the run's average."""

    def __init__(self) -> None:
        self._t_last: float | None = None
        self.tokens_seen = 0
        self.time_s = 0.0  # wall time of timed steps (the first steps, with warm-up, excluded)
        self.tokens_timed = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._t_last is None:
            self._t_last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        count = getattr(pl_module, "batch_tokens", None)  # a module whose batches are not packed token blocks
        n = (int(count(batch)) if callable(count) else batch["input_ids"][:, :-1].numel()) * trainer.world_size
        self.tokens_seen += n
        if self._t_last is not None and trainer.global_step > 1:  # skip warm-up steps
            dt = now - self._t_last
            self.time_s += dt
            self.tokens_timed += n
            pl_module.log("perf/tokens_per_s", n / max(dt, 1e-9))
        self._t_last = now
        pl_module.log("perf/tokens_seen", float(self.tokens_seen))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_last = None  # validation time is not training time

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_timed / self.time_s if self.time_s > 0 else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
