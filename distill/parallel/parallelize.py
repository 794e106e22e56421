"""`parallelize(model, mesh)`: lay a GPT out on a device mesh from outside the model (torchtitan's style;
nothing here imports Lightning). Works on a model built on the meta device (then materialise it with
``to_empty`` and load or initialise it) as well as on a built one.

1. Tensor parallelism (``tp`` > 1, `distill.parallel.tensor`): the dense weights split over ``tp`` with
   DTensor parallel styles; the experts' hidden units split with them in step 2.
2. Expert parallelism: each MoE layer's stacked expert parameters become DTensors sharded on dim 0 over
   the layer's expert-parallel mesh (g = min(ep, E) ranks; and on their hidden dim over ``tp``), and the
   layer gets an all-to-all dispatcher. The grouped experts compute with the local tensors (forward hooks
   swap them in and back out), so the model code never sees a DTensor.
3. ZeRO-3 (FSDP2 `fully_shard`): per MoE layer the experts over the ranks that hold the same experts
   (sharded on dim 1, next to the expert dim; w_out on dim 2 under tensor parallelism, which splits dim 1),
   then per block the dense parameters over all data-parallel ranks, then the root (embeddings, final norm,
   head). The expert gradients are divided by the number of data-parallel ranks, not by the replicas of
   each expert: the all-to-all backward already summed the g ranks of the group, so the result equals data
   parallelism with replicated experts. Where the ranks holding the same experts are this rank alone (ep
   takes every data-parallel rank, e.g. ep=2 on 2 ranks) and no mixed precision casts them, the experts stay
   out of FSDP (nothing to shard, gather or reduce; FSDP would only copy them in and out each step): their
   gradients are divided by the data-parallel ranks in the experts' backward (`_LocalExpertWeights`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from distill.moe import GroupedExperts, LocalDispatcher, MoELayer
from distill.parallel.checkpointing import checkpoint_block
from distill.parallel.config import ParallelConfig
from distill.parallel.dispatch import AllToAllDispatcher, CommTimer
from distill.parallel.hierarchical import HierarchicalAllToAllDispatcher, Traffic
from distill.parallel.mesh import ParallelMesh, layer_group_size
from distill.parallel.tensor import check_tensor_parallel, expert_tp_dim, tensor_parallel_dense
from distill.parallel.tensor_experts import TensorExpertDispatcher


def moe_layers(root: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in root.named_modules() if isinstance(m, MoELayer)]


def check_moe_layers(root: nn.Module, ep: int, what: str = "an MoE layer", key: str = "parallel") -> None:
    """ConfigError for the first MoE layer of `root` whose experts cannot be split over `ep` ranks."""
    for _, layer in moe_layers(root):
        layer_group_size(layer.num_experts, ep, what, key)


class _ScaleGrad(torch.autograd.Function):
    """The identity whose backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


class _LocalExpertWeights:
    """Forward hooks of a GroupedExperts module whose parameters are DTensors: inside its forward the
    parameters are their local tensors (differentiable views: the gradient reaches the DTensor).

    With a `grad_scale` (set where no FSDP reduction divides them) the parameters' gradients come out
    multiplied by it: the gradient entering the experts' backward (at their output) is multiplied by it, and the
    one leaving it for their input divided by it. Every parameter gradient is linear in the first and the input
    gets its own back, for two passes over the rows instead of a fresh copy of every expert weight gradient."""

    def __init__(self, module: nn.Module):
        self.grad_scale = 1.0
        self.swapped: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scaling = False
        module.register_forward_pre_hook(self.pre)
        module.register_forward_hook(self.post, prepend=True)  # before FSDP's post-forward reshard

    def pre(self, module: nn.Module, args: Any) -> Any:
        trained = False
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                local = p.to_local()
                trained |= p.requires_grad
                module._parameters[name] = local  # type: ignore[assignment]
                self.swapped[name] = (p, local)
        self.scaling = self.grad_scale != 1.0 and torch.is_grad_enabled() and trained
        if self.scaling:
            return (_ScaleGrad.apply(args[0], 1.0 / self.grad_scale), *args[1:])
        return None

    def post(self, module: nn.Module, args: Any, out: Any) -> Any:
        for name, (p, local) in self.swapped.items():
            if module._parameters.get(name) is local:
                module._parameters[name] = p  # type: ignore[assignment]
        self.swapped = {}
        if self.scaling:
            self.scaling = False
            return _ScaleGrad.apply(out, self.grad_scale)
        return None


def shard_experts(layer: MoELayer, ep_mesh: Any, timer: CommTimer | None = None, dispatcher: Any = None,
                  traffic: Traffic | None = None, param_mesh: Any = None) -> _LocalExpertWeights:
    """Keep this rank's dim-0 slice of the layer's experts as DTensors on `ep_mesh`; all-to-all dispatch
    (`dispatcher`, or the flat one over `ep_mesh`). With a 2-D `param_mesh` (ep, tp), also this rank's slice
    of the hidden units (the dispatcher then sums the slices' outputs: `TensorExpertDispatcher`)."""
    experts: GroupedExperts = layer.experts
    g, pos = ep_mesh.size(), ep_mesh.get_local_rank()
    n = layer.num_experts // g
    param_mesh = param_mesh if param_mesh is not None else ep_mesh
    tp, t = (param_mesh.size(1), param_mesh.get_local_rank(1)) if param_mesh.ndim == 2 else (1, 0)
    for name, p in list(experts.named_parameters(recurse=False)):
        local = p.detach()[pos * n : (pos + 1) * n]
        placements = [Shard(0)]
        if tp > 1:
            dim = expert_tp_dim(name)
            width = local.shape[dim] // tp
            local, placements = local.narrow(dim, t * width, width), [Shard(0), Shard(dim)]
        local = local.contiguous() if local.is_meta else local.clone(memory_format=torch.contiguous_format)
        dt = DTensor.from_local(local, param_mesh, placements, run_check=False)
        experts.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
    experts.expert_offset = pos * n
    layer.dispatcher = dispatcher or (AllToAllDispatcher(ep_mesh.get_group(), g, n, timer, traffic) if g > 1
                                      else LocalDispatcher())
    return _LocalExpertWeights(experts)


def _expert_fsdp_dim(experts: GroupedExperts, tp: int) -> Any:
    """FSDP's placement of an expert parameter: next to the expert dim (1), or for w_out under tensor
    parallelism (which splits its dim 1) dim 2."""
    w_out = experts.w_out
    return lambda p: Shard(2 if tp > 1 and p is w_out else 1)


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def parallelize(model: nn.Module, mesh: ParallelMesh, layout: ParallelConfig | None = None,
                timer: CommTimer | None = None, traffic: Traffic | None = None) -> nn.Module:
    """Shard `model` (a GPT: `.blocks`, MoE layers inside them) in place over `mesh`; returns it.

    Every rank calls it with the same model (collective: meshes are created on first use).
    """
    layout = layout or mesh.layout
    check_moe_layers(model, layout.ep)
    check_tensor_parallel(model.cfg, layout.tp)
    mp = MixedPrecisionPolicy(param_dtype=_dtype(layout.param_dtype), reduce_dtype=_dtype(layout.reduce_dtype))
    shard = dict(reshard_after_forward=layout.reshard_after_forward, mp_policy=mp)
    if mesh.tp is not None:
        tensor_parallel_dense(model, mesh.tp, layout.sequence_parallel)
    own: set[nn.Parameter] = set()  # expert parameters outside FSDP (a one-rank expert-data-parallel group)
    for block in model.blocks:
        for _, layer in moe_layers(block):
            g = layer_group_size(layer.num_experts, layout.ep)
            fsdp_mesh, ep_mesh, param_mesh = mesh.experts(g)
            J = mesh.ranks_per_node(g)
            inner = None
            if J:  # within the node first, then across nodes
                intra, inter = mesh.node_groups(g)
                inner = HierarchicalAllToAllDispatcher(ep_mesh.get_group(), intra, inter, g // J, J,
                                                       layer.num_experts // g, timer, traffic)
            elif g > 1:
                inner = AllToAllDispatcher(ep_mesh.get_group(), g, layer.num_experts // g, timer, traffic)
            if layout.tp > 1:  # dropping duplicates only pays when tokens move (g > 1)
                inner = TensorExpertDispatcher(inner or LocalDispatcher(), param_mesh.get_group(1),
                                               layout.drop_duplicate_tokens and g > 1, traffic)
            local = shard_experts(layer, ep_mesh, timer, inner, traffic, param_mesh)
            if fsdp_mesh.size() == 1 and mp.param_dtype is None:  # nothing to shard, gather or reduce: no FSDP
                local.grad_scale = 1.0 / layout.data_parallel
                own.update(layer.experts.parameters())
                continue
            fully_shard(layer.experts, mesh=fsdp_mesh, shard_placement_fn=_expert_fsdp_dim(layer.experts, layout.tp),
                        **shard)
            layer.experts.set_gradient_divide_factor(float(layout.data_parallel))
            if mesh.device_type == "cpu" and fsdp_mesh.size() > 1:  # gloo has no pre-multiplied sum: SUM, scale
                layer.experts.set_force_sum_reduction_for_comms(True)
        checkpoint_block(block, layout.activation_checkpointing)
        fully_shard(block, mesh=mesh.dense, ignored_params=own or None, **shard)
    fully_shard(model, mesh=mesh.dense, reshard_after_forward=False, mp_policy=mp, ignored_params=own or None)
    return model


class OutsideInferenceMode:
    """Forward hooks that run a module's forward, with FSDP's all-gathers and reshards around it, without
    gradients and outside inference mode, even when the caller is in inference mode: FSDP2 cannot unshard
    there (its all-gathered parameters would be inference tensors, which track no version counter). The
    inputs may be inference tensors; the outputs are ordinary tensors that need no gradient."""

    def __init__(self, module: nn.Module):
        self.active: list[tuple[Any, ...]] = []
        module.register_forward_pre_hook(self.enter, prepend=True)  # before FSDP's pre-forward (unshard)
        module.register_forward_hook(self.exit, always_call=True)  # after FSDP's post-forward (reshard)

    def enter(self, module: nn.Module, args: Any) -> None:
        modes = (torch.inference_mode(False), torch.no_grad())
        for mode in modes:
            mode.__enter__()
        self.active.append(modes)

    def exit(self, module: nn.Module, args: Any, out: Any) -> None:
        for mode in reversed(self.active.pop()):
            mode.__exit__(None, None, None)


def parallelize_frozen(model: nn.Module, mesh: ParallelMesh, timer: CommTimer | None = None) -> nn.Module:
    """A frozen model (a teacher) laid out on `mesh`: every FSDP module, the root included, reshards after its
    forward (there is no backward to free the gathered parameters, so between forwards a rank holds only its
    shards), and the forward may be called under inference mode. Collective, like `parallelize`."""
    parallelize(model, mesh, dataclasses.replace(mesh.layout, activation_checkpointing="none"), timer=timer)
    model.set_reshard_after_forward(True)  # type: ignore[operator]
    OutsideInferenceMode(model)
    return model.eval().requires_grad_(False)


def is_parallelized(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)
