"""`NonFiniteGuard`: stop training before a NaN/Inf loss term or gradient reaches the weights.

Lightning has no such check short of `detect_anomaly` (autograd's anomaly mode: slow, and it only raises
inside backward). This callback costs one small all-reduce and one host sync per optimizer step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from distill.errors import NonFiniteError


class NonFiniteGuard(L.Callback):
    """Before each optimizer step: stop the run (NonFiniteError) when a loss term or the gradient is NaN/Inf
    on any rank. Nothing has been applied yet, so the weights and every checkpoint stay finite.

    The module keeps its last training batch's terms in ``step_terms``; they are noted (on device, no sync)
    before each backward, so every micro-batch of an accumulated step counts.
    """

    def __init__(self) -> None:
        self._nonfinite: dict[str, torch.Tensor] = {}  # loss term -> "was NaN/Inf" since the last optimizer step
        self._last: dict[str, torch.Tensor] = {}

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        terms = getattr(pl_module, "step_terms", None) or {"loss": loss.detach()}
        for name, value in terms.items():
            bad = ~torch.isfinite(value).all()
            self._nonfinite[name] = bad | self._nonfinite[name] if name in self._nonfinite else bad
        self._last = dict(terms)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        names = list(self._nonfinite)
        grads = [_local(p.grad) for p in pl_module.parameters() if p.grad is not None]  # this rank's shards
        grad_bad = (~torch.isfinite(torch.nn.utils.get_total_norm(grads)) if grads
                    else torch.zeros((), dtype=torch.bool))
        flags = torch.stack([*(self._nonfinite[n] for n in names), grad_bad.to(pl_module.device)]).float()
        flags = trainer.strategy.reduce(flags, reduce_op="sum").tolist()
        self._nonfinite = {}
        if not any(flags):
            return
        step = trainer.global_step
        values = {n: float(v) for n, v in self._last.items()}
        bad = [n for n, f in zip(names, flags) if f and n != "loss"] or [n for n, f in zip(names, flags) if f]
        shown = ", ".join(f"{n}={values.get(n, float('nan')):.6g}" for n in names if n != "loss")
        rank_note = "" if trainer.world_size == 1 else " (on at least one rank; values of this rank)"
        if bad:
            raise NonFiniteError(f"non-finite loss term {' and '.join(bad)} at step {step}{rank_note}: "
                                 f"{shown}. Training stopped before the optimizer step.")
        param = next((n for n, p in pl_module.named_parameters()
                      if p.grad is not None and not torch.isfinite(_local(p.grad)).all()),
                     "a parameter on another rank")
        raise NonFiniteError(f"non-finite gradient at step {step} (first: {param}) while the loss terms "
                             f"were finite: {shown}. Training stopped before the optimizer step.")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) gradient; a plain tensor as it is. (The flags are summed over
    the ranks, so every element is looked at somewhere.)"""
    return t.to_local() if hasattr(t, "to_local") else t
