"""Parallel layouts on a device mesh: the `parallel` config node, meshes, `parallelize` (expert parallelism
and FSDP2), all-to-all token dispatch, gradient norms over the mesh, distributed checkpoints, sharded
loading from safetensors, and the Lightning strategy that applies them (docs/architecture.md; usage in
README.md, "Parallel layouts"). The pieces are imported from their modules.

The strategy (and with it Lightning) is imported on first use, so the pieces load with torch alone.
Select it with the Hydra config `strategy=mesh` (or the named layout `strategy=expert_parallel`); it is
not registered under a name in Lightning's StrategyRegistry.
"""

from typing import Any

from distill.parallel.config import ParallelConfig

__all__ = ["MeshStrategy", "ParallelConfig", "ParallelMesh", "parallelize"]


def __getattr__(name: str) -> Any:
    if name == "MeshStrategy":
        from distill.parallel.strategy import MeshStrategy

        return MeshStrategy
    if name == "ParallelMesh":
        from distill.parallel.mesh import ParallelMesh

        return ParallelMesh
    if name == "parallelize":
        from distill.parallel.parallelize import parallelize

        return parallelize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
