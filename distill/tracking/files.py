"""The tracking files' plumbing: JSON-safe values (summary.json, wandb summaries) and atomic rewrites."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` at once: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def scalar(value: Any) -> float | None:
    """``value`` (a number or a one-element tensor) as a float, or None."""
    try:
        v = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return v


def json_value(v: Any) -> Any:
    """JSON-safe: non-finite floats become None, other objects their string."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, Mapping):
        return {str(k): json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    s = scalar(v)
    return json_value(s) if s is not None else str(v)
