"""Mixture-of-Experts layer: router, grouped experts, dispatcher, residual and shared experts."""

from distill.moe.config import MoEConfig, MoEStats
from distill.moe.dispatch import LocalDispatcher, TokenDispatcher
from distill.moe.experts import MLP, GroupedExperts
from distill.moe.layer import MoELayer
from distill.moe.router import Router, Routing

__all__ = [
    "MLP",
    "GroupedExperts",
    "LocalDispatcher",
    "MoEConfig",
    "MoELayer",
    "MoEStats",
    "Router",
    "Routing",
    "TokenDispatcher",
]
