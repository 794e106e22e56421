"""distill: turn a large Mixture-of-Experts language model into a smaller Mixture-of-Students."""

import os

# PyTorch's CPU allocator puts tensors of 2 MB and more on transparent huge pages when this is set (read at
# its first allocation, so any import of distill before that counts). Without it, each step's large fresh
# buffers (an MoE layer's expert weight gradients are E x d x f) take a page fault per 4 KB, every step: about
# 15% of a CPU MoE layer's forward+backward at E=32 (README, "Benchmarks"). THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
