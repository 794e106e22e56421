"""`python -m distill.bench [section ...]`: run the benchmark sections (all of SECTIONS by default)."""

from __future__ import annotations

import importlib
import os
import sys

# Before torch is imported: PyTorch's CPU allocator puts tensors >= 2 MB on transparent huge pages, so
# a step's large fresh buffers (activations, expert gradients) are not dominated by 4 KB page faults.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

SECTIONS = ["moe", "train", "targets", "parallel", "optim", "alltoall"]  # modules of distill.bench with a main(); add yours here


def main(argv: list[str]) -> None:
    names = argv or SECTIONS
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        sys.exit(f"distill.bench: unknown section(s) {unknown}; known: {SECTIONS}")
    for name in names:
        print(f"== {name} ==", flush=True)
        importlib.import_module(f"distill.bench.{name}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
