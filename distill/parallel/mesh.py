"""Device meshes of a resolved `ParallelConfig` (docs/architecture.md, "Parallel layouts").

Ranks are laid out ``dp_replicate x dp_shard x ep x tp`` in row-major order, so a tensor-parallel group is
``tp`` consecutive ranks (one node's fast links) and an expert-parallel group is ``ep`` ranks ``tp`` apart.
Every rank outside tensor parallelism is a data-parallel rank of the dense parameters: FSDP shards them
over the `dense` mesh ``(dp_replicate, dp_shard * ep)``, and ``tp`` splits them (`tensor`). A MoE layer
with E experts uses ``g = min(ep, E)`` ranks (g must divide ep and E); its mesh is
``(dp_replicate, edp, ep, tp)`` with ``edp = dp_shard * ep / g``, where the ``ep`` dimension (g ranks)
splits the experts, ``tp`` their hidden units, and ``(dp_replicate, edp)`` are the ranks holding the same
expert slices: FSDP shards the expert parameters over them. Without tensor parallelism the meshes have no
``tp`` dimension.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from distill.errors import ConfigError
from distill.parallel.config import ParallelConfig


def layer_group_size(num_experts: int, ep: int, what: str = "an MoE layer", key: str = "parallel") -> int:
    """g = min(ep, E) ranks share a layer's experts; ConfigError unless g divides both ep and E."""
    g = min(ep, num_experts)
    if ep % g != 0 or num_experts % g != 0:
        raise ConfigError(
            "model.num_experts",
            f"{what} has {num_experts} experts, which cannot be split evenly under {key}.ep={ep}: its "
            f"expert-parallel group would have {g} ranks, and {g} must divide both the expert count and ep.",
            f"use expert counts that are multiples of {key}.ep (or divisors of it), or change {key}.ep.",
        )
    return g


class ParallelMesh:
    """The meshes of one layout (a resolved ParallelConfig), created on first use.

    Creating a mesh is collective: every rank asks for the same meshes in the same order (parallelize does,
    walking the same model on every rank).
    """

    def __init__(self, layout: ParallelConfig, device_type: str = "cpu"):
        self.layout = layout
        self.device_type = device_type
        self._root: DeviceMesh | None = None
        self._dense: DeviceMesh | None = None
        self._experts: dict[int, DeviceMesh] = {}

    @property
    def world_size(self) -> int:
        return self.layout.data_parallel * self.layout.tp

    def _mesh(self, shape: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
        if self.layout.tp > 1:
            shape, names = (*shape, self.layout.tp), (*names, "tp")
        return init_device_mesh(self.device_type, shape, mesh_dim_names=names)

    def _dense_root(self) -> DeviceMesh:
        if self._root is None:
            lay = self.layout
            self._root = self._mesh((lay.dp_replicate, lay.dp_shard * lay.ep), ("dp_replicate", "dp_shard"))
        return self._root

    @property
    def dense(self) -> DeviceMesh:
        """FSDP mesh of the dense parameters: (dp_shard * ep) or (dp_replicate, dp_shard * ep) for HSDP."""
        if self._dense is None:
            root = self._dense_root()
            self._dense = root["dp_replicate", "dp_shard"] if self.layout.dp_replicate > 1 else root["dp_shard"]
        return self._dense

    @property
    def tp(self) -> DeviceMesh | None:
        """The tensor-parallel mesh of the dense parameters (None without tensor parallelism)."""
        return self._dense_root()["tp"] if self.layout.tp > 1 else None

    def ranks_per_node(self, g: int) -> int | None:
        """J of a hierarchical all-to-all for a layer of group g (`parallel.ep_intra`), or None: flat."""
        J = self.layout.ep_intra
        return J if J is not None and 1 < J < g and g % J == 0 else None

    def expert_root(self, g: int) -> DeviceMesh:
        if g not in self._experts:
            lay = self.layout
            J = self.ranks_per_node(g)
            edp = lay.dp_shard * lay.ep // g
            self._experts[g] = (self._mesh((lay.dp_replicate, edp, g // J, J),
                                           ("dp_replicate", "edp", "ep_inter", "ep_intra"))
                                if J else self._mesh((lay.dp_replicate, edp, g), ("dp_replicate", "edp", "ep")))
        return self._experts[g]

    def experts(self, g: int) -> tuple[DeviceMesh, DeviceMesh, DeviceMesh]:
        """(FSDP mesh of the ranks holding the same expert slices, the g-rank expert-parallel mesh, the mesh the
        expert parameters are sharded on: the expert-parallel one, or (ep, tp)) of a layer of group g."""
        root = self.expert_root(g)
        fsdp = root["dp_replicate", "edp"] if self.layout.dp_replicate > 1 else root["edp"]
        ep = root["ep_inter", "ep_intra"]._flatten("ep") if self.ranks_per_node(g) else root["ep"]
        return fsdp, ep, (root["ep", "tp"] if self.layout.tp > 1 else ep)

    def node_groups(self, g: int) -> tuple[Any, Any]:
        """(within-node group, across-node group) of a hierarchical layer of group g."""
        root = self.expert_root(g)
        return root["ep_intra"].get_group(), root["ep_inter"].get_group()
