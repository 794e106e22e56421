"""`AtomicCheckpointIO`: a checkpoint is written to a temporary sibling file, flushed to disk, then renamed
over the target, so a run killed at any moment leaves either the old file or the new one, never half of
one; a checkpoint whose weights hold NaN/Inf is refused (the good ones stay). A file that cannot be read
back is named with what is wrong with it (`distill.train.resume.verify_checkpoint`).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from distill.errors import ConfigError, NonFiniteError
from distill.parallel.checkpoint import fsync_dir
from distill.train.resume import verify_checkpoint


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
        fsync_dir(path.parent)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if Path(path).is_dir():  # a sharded (DCP) checkpoint reaches this plugin only under another strategy
            raise ConfigError(
                "resume", f"{path} is a sharded checkpoint (written by strategy=mesh); this run's strategy "
                "reads single-file checkpoints.",
                "resume it with strategy=mesh: any layout and world size, one process (trainer.devices=1) included.")
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
