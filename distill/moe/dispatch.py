"""Token dispatchers: move (token, choice) rows between the router and the experts that hold them.

The MoE layer sorts its rows by GLOBAL expert id and hands them to a dispatcher; the dispatcher returns
the rows this process's experts must compute, grouped by local expert, and later brings the expert
outputs back in the original sorted order. `LocalDispatcher` is the one-process case (every expert is
local, nothing moves); an expert-parallel all-to-all dispatcher implements the same two calls.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class TokenDispatcher(Protocol):
    """What the MoE layer needs from a dispatcher (see the module docstring)."""

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """tokens [N, d] sorted by global expert, counts [E] long (rows per global expert) ->
        (rows for the local experts grouped by local expert [M, d], counts per local expert [E_local], handle)."""
        ...

    def combine(self, expert_out: torch.Tensor, handle: Any) -> torch.Tensor:
        """Expert outputs [M, d] in dispatched order -> outputs [N, d] in the order given to `dispatch`."""
        ...


class LocalDispatcher:
    """Every expert lives in this process: dispatch and combine are the identity."""

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return tokens, counts, None

    def combine(self, expert_out: torch.Tensor, handle: None) -> torch.Tensor:
        return expert_out
