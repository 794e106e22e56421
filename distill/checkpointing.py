"""Safe checkpoints and exact resume.

- `AtomicCheckpointIO`: a checkpoint is written to a temporary sibling file, flushed to disk, then renamed
  over the target, so a run killed at any moment leaves either the old file or the new one, never half
  of one; a checkpoint whose weights hold NaN/Inf is refused (the good ones stay).
- `verify_checkpoint` / `resolve_resume`: `resume=auto` continues from `<out_dir>/checkpoints/last.ckpt`
  when it is readable, else from the newest readable `step*.ckpt`, else starts fresh; a truncated or
  corrupt file is named in a warning and skipped (zip CRCs are checked, so flipped bytes count too).
- `ResumableLoader`: the train loader as Lightning checkpoints it. Lightning 2.6 restores the loop
  position but restarts a plain DataLoader at the first batch of the epoch (it only warns); this one
  records how many batches of which epoch were consumed and, after a restore, skips them at the index
  level (no batch is loaded to be thrown away).
- `TrainingRNG`: the torch / numpy / Python RNG state at the end of each training batch is put back at
  the start of the next one, and saved in checkpoints (per rank). Whatever runs between two steps
  (validation, checkpointing, loading the teacher, starting a loader) cannot shift the stream that
  router noise, dropout and random token dropping draw from, so a resumed run draws the same numbers.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import BatchSampler, DataLoader, Sampler

from distill.data import LMDataModule
from distill.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
AUTO = ("auto", "last")  # "last" is the older spelling of "auto"
FRESH = ("never", "none")  # or null: start from step 0
REQUIRED_KEYS = ("state_dict", "global_step", "loops")


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf. The run stops before the values reach the weights or a checkpoint."""


@rank_zero_only
def warn(message: str) -> None:
    print(f"distill: warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# writing


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def first_nonfinite(state_dict: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``state_dict`` holding NaN/Inf, or None."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints atomically (temporary file, fsync, rename) and refuse ones with NaN/Inf weights."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        bad = first_nonfinite(checkpoint.get("state_dict", {}))
        if bad is not None:
            raise NonFiniteError(
                f"weights `{bad}` hold NaN/Inf at step {checkpoint.get('global_step')}: checkpoint {path.name} "
                "was not written (the earlier checkpoints are intact)."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            problem = verify_checkpoint(path)
            if problem is None:  # the file is fine: the error is about something else
                raise
            raise ConfigError(
                "resume", f"checkpoint {path} cannot be read: {problem}.",
                "resume=auto skips unreadable checkpoints; or pass an earlier step*.ckpt.",
            ) from err


# ----------------------------------------------------------------------------------------------------
# reading and choosing what to resume from


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def inspect_checkpoint(path: str | os.PathLike) -> tuple[str | None, int | None]:
    """(None, global_step) when ``path`` is a complete, readable Lightning checkpoint; else (what is wrong, None).

    Reads the whole file once: every zip record's CRC is checked, then the small pickle is loaded
    (tensors memory-mapped, not read again) and the keys a resume needs are looked up.
    """
    p = Path(path)
    if not p.is_file():
        return "no such file", None
    if p.stat().st_size == 0:
        return "the file is empty (truncated)", None
    try:
        with zipfile.ZipFile(p) as z:
            broken = z.testzip()
        if broken is not None:
            return f"record {broken} fails its CRC check (corrupt)", None
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except zipfile.BadZipFile as err:
        return f"not a complete checkpoint archive (truncated or corrupt: {err})", None
    except Exception as err:  # torch raises many types for a damaged archive or pickle
        return f"cannot be loaded ({_first_line(err)})", None
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        return f"not a training checkpoint (no {', '.join(missing)})", None
    return None, int(ckpt["global_step"])


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a complete, readable training checkpoint; else what is wrong with it."""
    return inspect_checkpoint(path)[0]


def _step_of(path: Path) -> int | None:
    m = re.fullmatch(r"step(\d+)", path.stem)
    return int(m.group(1)) if m else None


def latest_good_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint `resume=auto` continues from: the readable one of the highest step (last.ckpt on a tie),
    warning about each unreadable one on the way. A run killed between writing ``stepN.ckpt`` and
    ``last.ckpt`` continues from step N."""
    if not ckpt_dir.is_dir():
        return None
    for leftover in ckpt_dir.glob(".*.ckpt.tmp-*"):
        leftover.unlink(missing_ok=True)  # a save that was killed half-way
    candidates: list[tuple[int, bool, Path]] = []  # (step, already verified, path)
    for path in ckpt_dir.glob("*.ckpt"):
        if path.name.startswith("."):
            continue
        named = _step_of(path)
        if named is not None:
            candidates.append((named, False, path))
            continue
        problem, inner = inspect_checkpoint(path)  # last.ckpt (or a renamed file): its step is inside
        if problem is None:
            candidates.append((inner, True, path))
        else:
            warn(f"checkpoint {path} is unusable: {problem}. Trying the previous one.")
    for _, verified, path in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
        problem = None if verified else verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"checkpoint {path} is unusable: {problem}. Trying the previous one.")
    if any(ckpt_dir.glob("*.ckpt")):
        warn(f"no usable checkpoint in {ckpt_dir}: starting from step 0.")
    return None


def resolve_resume(resume: str | None, out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``resume`` is auto (or last), never (or null), or a checkpoint path."""
    if resume is None or str(resume).lower() in FRESH:
        return None
    if resume in AUTO:
        return latest_good_checkpoint(Path(out_dir) / CHECKPOINT_DIR)
    path = Path(resume).expanduser()
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ConfigError(
            "resume",
            f"cannot resume from {path}: {problem}.",
            "pass another checkpoint, resume=auto (the newest readable one in <out_dir>/checkpoints) "
            "or resume=never.",
        )
    return path


# ----------------------------------------------------------------------------------------------------
# data position


class _SkipFirst(Sampler):
    """A sampler that drops the first ``skip`` indices of its next pass (then resets ``skip`` to 0)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.skip = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        it = iter(self.inner)
        for _ in range(skip):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return len(self.inner)


class ResumableLoader:
    """A train DataLoader that resumes mid-epoch at the exact next batch (Lightning's `_Stateful`).

    ``state_dict`` records the sampler's epoch and the batches of it handed out so far; after
    ``load_state_dict`` the next pass over the same epoch skips those batches (their indices only).
    The pass starts on the first ``next()``: after Lightning has called the sampler's ``set_epoch``.
    """

    def __init__(self, loader: DataLoader):
        batches = loader.batch_sampler
        if not isinstance(batches, BatchSampler):
            raise TypeError("ResumableLoader needs a DataLoader built with batch_size (a BatchSampler)")
        self.loader = loader
        self._skipper = _SkipFirst(batches.sampler)
        batches.sampler = self._skipper
        self._epoch: int | None = None
        self._served = 0  # batches of the current pass handed out
        self._restored: dict[str, Any] | None = None

    # what Lightning looks at: length, dataset, samplers (set_epoch), worker_init_fn
    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    @property
    def worker_init_fn(self) -> Any:
        return self.loader.worker_init_fn

    @worker_init_fn.setter
    def worker_init_fn(self, fn: Any) -> None:
        self.loader.worker_init_fn = fn

    def __iter__(self) -> Iterator[Any]:
        epoch = getattr(self.loader.sampler, "epoch", None)
        skip, restored, self._restored = 0, self._restored, None
        if restored is not None and restored["epoch"] == epoch and 0 < restored["batches"] < len(self.loader):
            skip = restored["batches"]
        self._skipper.skip = skip * (self.loader.batch_size or 1)
        self._epoch, self._served = epoch, skip
        for batch in self.loader:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = dict(state)


class ResumableDataModule(LMDataModule):
    """`LMDataModule` whose train loader is a `ResumableLoader` (what the apps train with)."""

    def train_dataloader(self) -> ResumableLoader:  # type: ignore[override]
        return ResumableLoader(super().train_dataloader())


# ----------------------------------------------------------------------------------------------------
# random number generators


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
