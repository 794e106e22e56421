"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP): each rank writes only its shards, nothing
is gathered; keys are the model's and the optimizer's fully qualified names with global shapes, so any
layout (one process included) resumes any other.

A checkpoint is a directory ``stepNNNNNN.ckpt/`` holding ``.metadata`` (DCP's index), one ``__<rank>_0.distcp``
per rank and ``meta.pt`` (the rest of Lightning's checkpoint: step, loops, callbacks, schedulers). It is
written to a hidden sibling directory and renamed over the target only once complete, so a save killed at
any moment leaves the last good checkpoint as it was.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

META = "meta.pt"  # Lightning's name (lightning.fabric.utilities.load._METADATA_FILENAME)
DCP_INDEX = ".metadata"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / DCP_INDEX).is_file()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse)."""
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


def dcp_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor a DCP checkpoint holds (its index only)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(path)).read_metadata()
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def inspect_sharded(path: str | os.PathLike) -> tuple[str | None, int | None]:
    """(None, global_step) for a complete sharded checkpoint; else (what is wrong, None). Reads the index and
    ``meta.pt`` and checks that every shard file the index names exists and is long enough (a truncated or
    missing shard is named), without reading any tensor."""
    from torch.distributed.checkpoint import FileSystemReader

    p = Path(path)
    if not (p / DCP_INDEX).is_file():
        return f"no {DCP_INDEX} (not a complete sharded checkpoint)", None
    if not (p / META).is_file():
        return f"no {META} (not a complete sharded checkpoint)", None
    try:
        meta = FileSystemReader(str(p)).read_metadata()
    except Exception as err:
        return f"its index {DCP_INDEX} cannot be read ({type(err).__name__}: {err})", None
    needed: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        f = p / name
        if not f.is_file():
            return f"shard file {f} is missing", None
        if f.stat().st_size < size:
            return f"shard file {f} is truncated ({f.stat().st_size} of {size} bytes)", None
    try:
        rest = torch.load(p / META, map_location="cpu", weights_only=True)
    except Exception as err:
        return f"{p / META} cannot be loaded ({type(err).__name__}: {err})", None
    if "global_step" not in rest or "loops" not in rest:
        return f"{p / META} is not a training checkpoint", None
    from distill.models.fused import layout_problem

    problem = layout_problem(rest)
    return (problem, None) if problem else (None, int(rest["global_step"]))


def architecture_mismatch(path: Path, expected: Mapping[str, Any]) -> str | None:
    """What differs between the model tensors a checkpoint holds and ``expected`` (name -> tensor with the
    global shape, e.g. a sharded state dict), or None."""
    found = {k.removeprefix("state_dict."): v for k, v in dcp_shapes(path).items() if k.startswith("state_dict.")}
    missing = sorted(set(expected) - set(found))
    if missing:
        return f"it has no {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    extra = sorted(set(found) - set(expected))
    if extra:
        return f"it holds {extra[0]}, which this model does not have"
    for name, value in expected.items():
        if tuple(value.shape) != found[name]:
            return f"{name} is {list(found[name])} there and {list(value.shape)} here"
    return None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded(state: dict[str, Any], meta: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` (sharded state dicts) with DCP and ``meta`` (rank 0) to ``path`` atomically. Collective."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    token = _broadcast(uuid.uuid4().hex[:8])
    tmp = path.with_name(f".{path.name}.tmp-{token}")
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    if _rank() == 0:
        with open(tmp / META, "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        old = path.with_name(f".{path.name}.old-{token}")
        if path.exists():
            os.replace(path, old)  # a kill right here leaves the newest step*.ckpt for resume=auto
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(path.parent)
    _barrier()
    return path


def load_sharded(state: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Fill ``state`` (sharded state dicts of this layout) in place from a DCP checkpoint written at any
    layout; returns ``meta.pt``. Collective."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=str(path))
    return torch.load(Path(path) / META, map_location="cpu", weights_only=True)


def remove_leftovers(ckpt_dir: Path) -> None:
    """Clean up after a save that was killed: a replaced checkpoint (``.X.ckpt.old-*``) whose successor never
    arrived is put back; half-written ones (``.X.ckpt.tmp-*``, files or directories) are deleted."""
    for old in ckpt_dir.glob(".*.ckpt.old-*"):
        target = ckpt_dir / old.name[1:].rsplit(".old-", 1)[0]
        if not target.exists():
            os.replace(old, target)
    for leftover in [*ckpt_dir.glob(".*.ckpt.tmp-*"), *ckpt_dir.glob(".*.ckpt.old-*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
