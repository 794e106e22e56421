"""What a run tells its user: `ConfigError` (bad input, naming the config key or file to fix),
`NonFiniteError` (training produced NaN/Inf) and `warn` (a one-line warning on rank zero).

Torch and Lightning are not imported here, so every module can raise these cheaply.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """Bad user input. ``key`` is the config key (e.g. ``data.text_column``) the user must change."""

    def __init__(self, key: str, problem: str, fix: str | None = None):
        self.key = key
        self.problem = problem
        self.fix = fix
        msg = f"config key `{key}`: {problem}"
        if fix:
            msg += f" Fix: {fix}"
        super().__init__(msg)


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf. The run stops before the values reach the weights or a checkpoint."""


def warn(message: str) -> None:
    """Print ``distill: warning: <message>`` to stderr, on global rank zero only."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only  # sets rank_zero_only.rank

    if rank_zero_only.rank == 0:
        print(f"distill: warning: {message}", file=sys.stderr, flush=True)


# Remedies for the component checks that state only the problem (one place for both ways an app exits).
FIXES = {
    "model.moe.top_k": "lower model.moe.top_k, or give every MoE layer at least that many experts (model.num_experts).",
    "model.num_experts": "give every MoE layer at least one expert, e.g. model.num_experts=[4,8].",
    "model.n_heads": "pick model.n_heads so that model.d_model / model.n_heads is even.",
    "student.depth_ratio": "e.g. student.depth_ratio=0.875 (the paper's 24 -> 21 layers), or set student.n_layers.",
    **{f"{node}.{dim}": f"e.g. {node}.{dim}=2, with {node}.dp_replicate x dp_shard x ep = trainer.devices x "
       "trainer.num_nodes (one of them may be -1: the rest)."
       for node in ("parallel", "teacher.parallel") for dim in ("dp_replicate", "dp_shard", "ep")},
    "data.val_fraction": "e.g. 0.05; data.val_fraction + data.test_fraction must leave documents to train on.",
    "data.test_fraction": "e.g. 0.05; data.val_fraction + data.test_fraction must leave documents to train on.",
    "kd.kd_weight": "e.g. kd.kd_weight=1.0 (0 turns the KD term off).",
    "kd.ce_weight": "e.g. kd.ce_weight=1.0.",
}


def with_fix(err: ConfigError) -> ConfigError:
    """``err``, with a fix when the component that raised it stated only the problem."""
    if err.fix:
        return err
    fix = FIXES.get(err.key, f"change `{err.key}` to a value the problem above allows "
                             "(`--cfg job` prints the composed config).")
    return ConfigError(err.key, err.problem, fix)


def exit_on_config_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an entry point: a ConfigError prints one clear line to stderr and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            print(f"distill: error: {with_fix(err)}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
