"""`import distill` turns on PyTorch's transparent-huge-page allocation for large CPU tensors (distill/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAULTS = """
import resource, sys
if sys.argv[1] == "distill":
    import distill  # noqa: F401
import torch
torch.ones(8 << 20)  # warm-up: torch's first allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    t = torch.ones(8 << 20)  # 32 MB, allocated, touched and freed
    del t
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def run(code: str, *args: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**base, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_import_sets_the_default_and_the_users_value_wins():
    show = "import os, distill; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    assert run(show) == "1"
    assert run(show, THP_MEM_ALLOC_ENABLE="0") == "0"


def thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text[text.index("[") + 1 : text.index("]")]


@pytest.mark.skipif(thp_mode() != "madvise", reason="huge pages for every process ('always') or for none")
def test_large_tensors_take_fewer_page_faults_after_import_distill():
    plain = float(run(FAULTS, "torch"))
    with_distill = float(run(FAULTS, "distill"))
    assert plain > 4000, f"a fresh 32 MB tensor should fault its 8192 4-KB pages: {plain}"
    assert with_distill < plain / 4, (with_distill, plain)
