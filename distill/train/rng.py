"""`TrainingRNG`: the torch / numpy / Python RNG state at the end of each training batch is put back at the
start of the next one, and saved in checkpoints (per rank). Whatever runs between two steps (validation,
checkpointing, loading the teacher, starting a loader) cannot shift the stream that router noise, dropout
and random token dropping draw from, so a resumed run draws the same numbers.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

from distill.errors import warn


def rng_state() -> dict[str, Any]:
    """torch (and CUDA, once initialised), numpy and Python RNG states, in types a weights-only load accepts."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (also after a checkpoint round trip turned its tuples into lists)."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class TrainingRNG(L.Callback):
    """Keep the training RNG stream a function of the training steps alone, and checkpoint it (per rank)."""

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None  # taken at the end of the last training batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._state is not None:
            set_rng_state(self._state)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._state = rng_state()

    def state_dict(self) -> dict[str, Any]:
        state = self._state or rng_state()
        rank, world = _rank_world()
        if world > 1:
            states: list[Any] = [None] * world
            torch.distributed.all_gather_object(states, state)  # every rank builds the checkpoint dict
            return {"per_rank": states}
        return {"per_rank": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["per_rank"]
        rank, world = _rank_world()
        if len(states) != world:
            warn(f"the checkpoint holds the RNG states of {len(states)} ranks, this run has {world}: random "
                 "draws (router noise, dropout) will not repeat those of the original run.")
        self._state = states[rank % len(states)]


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
