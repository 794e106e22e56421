"""`distill.atomic.AtomicDir`: a directory appears whole or not at all (exports and teacher targets use it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.atomic import AtomicDir


def test_replaces_the_old_directory_only_when_the_block_succeeds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with AtomicDir(out) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with AtomicDir(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        (tmp / "new.txt").write_text("whole")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_creates_missing_parents(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    with AtomicDir(out) as tmp:
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x"
