"""Which checkpoint a run continues from.

`resume=auto` continues from ``<out_dir>/checkpoints/last.ckpt`` when it is readable, else from the
newest readable ``step*.ckpt`` (files, or the directories of sharded checkpoints), else starts fresh; a truncated or corrupt file is named in a warning and
skipped (zip CRCs are checked, so flipped bytes count too). `resume=never` (or null) starts from step 0;
any other value is the path of a checkpoint, which must be readable.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import torch

from distill.config import RESUME_AUTO, RESUME_FRESH
from distill.errors import ConfigError, warn
from distill.models.fused import layout_problem

CHECKPOINT_DIR = "checkpoints"  # under out_dir
REQUIRED_KEYS = ("state_dict", "global_step", "loops")  # what a resume needs from a checkpoint


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def inspect_checkpoint(path: str | os.PathLike) -> tuple[str | None, int | None]:
    """(None, global_step) when ``path`` is a complete, readable Lightning checkpoint; else (what is wrong, None).

    Reads the whole file once: every zip record's CRC is checked, then the small pickle is loaded
    (tensors memory-mapped, not read again) and the keys a resume needs are looked up.
    """
    p = Path(path)
    if p.is_dir():  # a sharded checkpoint (strategy=mesh): its index, shard sizes and meta.pt
        from distill.parallel.checkpoint import inspect_sharded

        return inspect_sharded(p)
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
    problem = layout_problem(ckpt)
    return (problem, None) if problem else (None, int(ckpt["global_step"]))


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
    from distill.parallel.checkpoint import remove_leftovers

    remove_leftovers(ckpt_dir)  # a save that was killed half-way
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
    """The checkpoint to resume from: ``resume`` is auto, never (or null), or a checkpoint path."""
    if resume is None or str(resume).lower() in RESUME_FRESH:
        return None
    if resume == RESUME_AUTO:
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
