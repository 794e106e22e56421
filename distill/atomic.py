"""Directories that appear whole or not at all: written in a temporary sibling, renamed into place last."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType


class AtomicDir:
    """A temporary sibling of `out` (created now, so a failure to create it raises before any work) to fill
    inside ``with AtomicDir(out) as tmp:``. When the block ends without an error it replaces `out` (an
    older `out` is removed first; readers see the old directory or the new one, never a half-written one);
    on an error the temporary directory is removed and `out` is left as it was."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if kind is None:
                if self.out.exists():
                    shutil.rmtree(self.out)
                os.replace(self.path, self.out)
        finally:
            if self.path.exists():
                shutil.rmtree(self.path, ignore_errors=True)
