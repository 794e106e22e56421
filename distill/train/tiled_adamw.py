"""AdamW whose step walks each parameter tile by tile (`optim.tile_size`): bounded temporaries.

torch's single-tensor AdamW (`foreach=False`, the CPU default) allocates two parameter-sized temporaries
per tensor for the denominator (`exp_avg_sq.sqrt()`, then its division by the bias correction; and the
previous tensor's denominator is still referenced meanwhile), so the step's peak temporary memory grows
with the largest tensors, e.g. the stacked [E, d, f] expert weights.
`TiledAdamW` applies the same arithmetic, op for op, to slices of at most `tile_size` elements of the
parameter's flattened local tensor: the temporaries are bounded by the tile, and every op is
elementwise with the same python-float scalars, so the results are bit-identical to
`torch.optim.AdamW(..., foreach=False)` (tests/test_tiled_adamw.py checks `torch.equal`).

State keys, their shapes and the `step` scalar match torch's AdamW, and the param groups carry
torch's keys, so state dicts load into either class and `torch.distributed.checkpoint.state_dict`
works. DTensor (FSDP2-sharded) parameters are updated through `.to_local()` views of the parameter,
its gradient and its states. Locals that are not all contiguous are tiled along dim 0 instead (a tile
is a block of whole rows, at least one row), which still only creates views.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

# Group keys torch's Adam/AdamW keep; ours carries them for state-dict compatibility. amsgrad and
# maximize must stay False; foreach/fused/capturable/differentiable do not change the tiled step.
_TORCH_KEYS = {
    "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
    "differentiable": False, "fused": None, "decoupled_weight_decay": True,
}  # fmt: skip


def _scalar_dtype() -> torch.dtype:
    """The dtype torch's AdamW gives `state["step"]` (non-fused, non-capturable)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _tiles(tensors: tuple[Tensor, ...], tile_size: int) -> Iterator[tuple[Tensor, ...]]:
    """Matching views of at most `tile_size` elements (at least one dim-0 row when not contiguous)."""
    if all(t.is_contiguous() for t in tensors):
        flat = [t.view(-1) for t in tensors]
        n = flat[0].numel()
        for start in range(0, n, tile_size):
            yield tuple(f[start : start + tile_size] for f in flat)
    elif tensors[0].dim() == 0:
        yield tensors
    else:
        row = max(1, math.prod(tensors[0].shape[1:]))
        rows = max(1, tile_size // row)
        yield from zip(*(t.split(rows, dim=0) for t in tensors), strict=True)


def _check_flags(group: dict[str, Any]) -> None:
    for key in ("amsgrad", "maximize"):
        if group.get(key, False):
            raise ValueError(f"TiledAdamW does not support {key}=True; use torch.optim.AdamW.")
    if not group.get("decoupled_weight_decay", True):
        raise ValueError("TiledAdamW is AdamW (decoupled weight decay); this group has Adam's L2 decay.")
    for key in ("lr", "eps", "weight_decay"):
        if isinstance(group[key], Tensor):
            raise ValueError(f"TiledAdamW takes a python float {key}, got a Tensor.")
    if any(isinstance(b, Tensor) for b in group["betas"]):
        raise ValueError("TiledAdamW takes python float betas, got a Tensor.")


class TiledAdamW(torch.optim.Optimizer):
    """`torch.optim.AdamW` (single-tensor arithmetic, bit-identical) with tile-bounded temporaries.

    `tile_size` (elements, >= 1) is an attribute of the optimizer, not of the param groups: it does not
    change the results, so it is not part of the state dict either.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        tile_size: int = 1 << 16,
        amsgrad: bool = False,
        maximize: bool = False,
    ) -> None:
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
            raise ValueError(f"tile_size must be an int >= 1 (elements), got {tile_size!r}")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i in (0, 1):
            if not 0.0 <= betas[i] < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(_TORCH_KEYS, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        defaults.update(amsgrad=amsgrad, maximize=maximize)
        _check_flags(defaults)
        self.tile_size = tile_size
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _TORCH_KEYS.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if p_state and not torch.is_tensor(p_state["step"]):  # very old checkpoints: a number
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=_scalar_dtype())

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_flags(group)
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        """One parameter: `_single_tensor_adam` of torch/optim/adam.py (decoupled decay), tiled."""
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("TiledAdamW does not support sparse gradients.")
        if torch.is_complex(p):
            raise RuntimeError("TiledAdamW does not support complex parameters; use torch.optim.AdamW.")
        if isinstance(p, DTensor) != isinstance(grad, DTensor) or (
                isinstance(p, DTensor) and grad.placements != p.placements):
            raise RuntimeError("TiledAdamW: the gradient must be laid out like its parameter (DTensor "
                               f"placements {getattr(p, 'placements', None)} vs {getattr(grad, 'placements', None)}).")
        state = self.state[p]
        if len(state) == 0:  # the same lazy initialisation as torch's Adam._init_group
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype(), device="cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        lr, (beta1, beta2) = group["lr"], group["betas"]
        weight_decay, eps = group["weight_decay"], group["eps"]

        step_t = state["step"]
        step_t += 1
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5

        locals_ = tuple(_local(t) for t in (p, grad, state["exp_avg"], state["exp_avg_sq"]))
        if len({t.shape for t in locals_}) != 1:
            raise RuntimeError(f"TiledAdamW: local shapes differ: {[tuple(t.shape) for t in locals_]}")
        for param, g, exp_avg, exp_avg_sq in _tiles(locals_, self.tile_size):
            if weight_decay != 0:
                param.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)
            del denom  # else it lives on through the next tile's sqrt and division: 3 tiles, not 2
