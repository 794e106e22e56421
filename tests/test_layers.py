"""The layer rules of docs/architecture.md, checked on the code itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "teachers", "students")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports are not used in this project)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_components_load_without_config_or_training_libraries() -> None:
    code = ("import sys, distill.models, distill.moe, distill.kd, distill.data.config; "
            "print(sorted(m for m in ('omegaconf', 'hydra', 'lightning', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"the components import {out.stdout.strip()}"


def test_no_source_file_over_300_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long


def test_teachers_and_students_do_not_import_each_other() -> None:
    for pkg, other in (("teachers", "students"), ("students", "teachers")):
        for path in (ROOT / pkg).rglob("*.py"):
            bad = {m for m in imported_modules(path) if m == other or m.startswith(other + ".")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_models_and_moe_import_nothing_above_them() -> None:
    above = ("omegaconf", "hydra", "lightning", "distill.train", "distill.resolve", "distill.config", "teachers",
             "students", "distill.parallel")
    for pkg in ("models", "moe"):
        for path in (ROOT / "distill" / pkg).rglob("*.py"):
            bad = {m for m in imported_modules(path) if m.startswith(above)}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
