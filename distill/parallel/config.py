"""The `parallel` config node: a device mesh of named dimensions (docs/architecture.md, "Parallel layouts").

``dp_replicate x dp_shard x ep x tp`` is the world size; one dimension may be ``-1`` ("the rest").

- ``ep``: each MoE layer's experts are split over ``ep`` ranks (a layer with fewer experts uses a
  sub-group and replicates); tokens move by all-to-all.
- ``dp_shard``: ZeRO-3 (FSDP2). Every rank is a data-parallel rank for the dense parameters, which are
  sharded over ``dp_shard x ep`` ranks; an expert's parameters are sharded over the ranks that hold
  that expert.
- ``dp_replicate``: HSDP, whole replicas of the sharded model (``dp_replicate=W`` is plain DDP).
- ``tp``: tensor parallelism (`distill.parallel.tensor`): attention heads, MLP and expert hidden units and
  the vocabulary split over ``tp`` consecutive ranks, which share one micro-batch. With
  ``drop_duplicate_tokens`` (default) each of them sends only its share of the rows through the expert
  all-to-all (DeepSpeed-TED). ``sequence_parallel`` splits the residual stream between them on the sequence
  (norms and dropout on 1/tp of the positions; the sequence length must be a multiple of ``tp``).
- ``ep_intra``: the ranks of one node inside an expert-parallel group (must divide ``ep``): the all-to-all
  then runs within the node first, then across nodes (`distill.parallel.hierarchical`).

Plain dataclass, no torch: the app layer checks it before any process exists.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from distill.errors import ConfigError

DIMS = ("dp_replicate", "dp_shard", "ep", "tp")
DTYPES = ("float32", "bfloat16", "float16")
CHECKPOINTING = ("none", "full", "moe_only")  # parallel.activation_checkpointing (distill/parallel/checkpointing.py)


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: the rest of the world
    ep: int = 1
    tp: int = 1  # tensor parallelism: tp consecutive ranks share a micro-batch and split the large weights
    drop_duplicate_tokens: bool = True  # with tp > 1: each tp rank sends only its share through the all-to-all
    sequence_parallel: bool = False  # with tp > 1: norms and dropout on 1/tp of the positions (Megatron-SP)
    # ranks per node inside an expert-parallel group: exchange within a node first, then across (null: flat)
    ep_intra: Optional[int] = None
    reshard_after_forward: bool = True  # ZeRO-3: free the gathered block after its forward
    activation_checkpointing: str = "none"  # none | full | moe_only (recompute, but keep the all-to-alls)
    param_dtype: Optional[str] = None  # FSDP compute dtype (e.g. bfloat16); null: the parameters' own
    reduce_dtype: str = "float32"  # gradient reduce-scatter dtype

    def sizes(self) -> dict[str, int]:
        return {d: getattr(self, d) for d in DIMS}

    def resolve(self, world: int, key: str = "parallel") -> ParallelConfig:
        """A copy with ``-1`` replaced by the rest of the world; ConfigError (naming ``key.<dim>``) unless the
        sizes are integers >= 1 (one -1 allowed) whose product is ``world``."""
        sizes = self.sizes()
        for dim, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
                raise ConfigError(f"{key}.{dim}", f"must be an integer >= 1 or -1 (the rest), got {value!r}.")
        rest = [d for d, v in sizes.items() if v == -1]
        if len(rest) > 1:
            raise ConfigError(f"{key}.{rest[1]}", f"only one dimension may be -1, but {rest} are.",
                              f"give {key}.{rest[1]} a size.")
        known = math.prod(v for v in sizes.values() if v != -1)
        if rest:
            if world % known:
                culprit = _largest({d: v for d, v in sizes.items() if v != -1})
                raise ConfigError(f"{key}.{culprit}", f"{key}.{rest[0]} is -1 (the rest), but the other dimensions' "
                                  f"product {known} does not divide the world size {world}.", _world_fix(key))
            sizes[rest[0]] = world // known
        elif known != world:
            layout = " x ".join(f"{d}={v}" for d, v in sizes.items() if v != 1) or "all 1"
            raise ConfigError(f"{key}.{_largest(sizes)}", f"the layout {layout} has {known} ranks, but the world "
                              f"size is {world} (trainer.devices x trainer.num_nodes).", _world_fix(key))
        intra = self.ep_intra
        if intra is not None and (isinstance(intra, bool) or not isinstance(intra, int) or intra < 1
                                  or sizes["ep"] % intra):
            raise ConfigError(f"{key}.ep_intra", f"must be an integer >= 1 that divides {key}.ep={sizes['ep']}, "
                              f"got {intra!r}.", "use the GPUs per node (trainer.devices), or null for a flat "
                              "all-to-all.")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ConfigError(f"{key}.activation_checkpointing", f"unknown value {self.activation_checkpointing!r}.",
                              "use none, full or moe_only (recompute the blocks but keep the all-to-all outputs).")
        for key_, value in (("param_dtype", self.param_dtype), ("reduce_dtype", self.reduce_dtype)):
            if value is not None and value not in DTYPES:
                raise ConfigError(f"{key}.{key_}", f"unknown dtype {value!r}.", f"use one of {list(DTYPES)}.")
        return dataclasses.replace(self, **sizes)

    def describe(self) -> str:
        return " x ".join(f"{d}={getattr(self, d)}" for d in DIMS if getattr(self, d) != 1) or "one process"

    @property
    def data_parallel(self) -> int:
        """Ranks reading different micro-batches: every rank but the tensor-parallel copies."""
        return self.dp_replicate * self.dp_shard * self.ep


@dataclass
class TeacherParallelConfig:
    """The `teacher.parallel` node: the teacher's own layout. Every key null: the student's (`parallel`). Any
    key set: a layout of its own, the keys left null at ParallelConfig's defaults (dp_shard -1: the rest)."""

    dp_replicate: Optional[int] = None
    dp_shard: Optional[int] = None
    ep: Optional[int] = None
    tp: Optional[int] = None
    drop_duplicate_tokens: Optional[bool] = None
    sequence_parallel: Optional[bool] = None
    ep_intra: Optional[int] = None
    reshard_after_forward: Optional[bool] = None
    activation_checkpointing: Optional[str] = None
    param_dtype: Optional[str] = None
    reduce_dtype: Optional[str] = None

    def layout(self) -> ParallelConfig | None:
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return ParallelConfig(**given) if given else None


def _largest(sizes: dict[str, int]) -> str:
    return max((d for d in DIMS if d in sizes), key=lambda d: sizes[d])


def _world_fix(key: str) -> str:
    return (f"make {key}.dp_replicate x dp_shard x ep x tp equal the world size, or set one of them to -1 "
            "(the rest).")


def parallel_config(node: Any, key: str = "parallel") -> ParallelConfig:
    """A ParallelConfig from a mapping (a config node); unknown keys raise ConfigError naming ``key.<name>``."""
    from distill.moe.config import fields_from_mapping

    if isinstance(node, ParallelConfig):
        return node
    return ParallelConfig(**fields_from_mapping(ParallelConfig, node or {}, key))
