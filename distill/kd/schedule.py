"""The `kd` config node (KDConfig, with its checks) and the staged-KD schedule.

`KDSchedule(cfg, max_steps)` says at each optimizer step (Lightning's 0-based `global_step`) whether KD
is on and with what weight. KD is on for step < stop_step; stop_step 0 means KD is never on
(`conf/kd/none.yaml`; `KDSchedule.uses_teacher` is then False); no stop step means KD for the whole run
(`conf/kd/full.yaml`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from distill.errors import ConfigError

LOSSES = ("forward_kl", "reverse_kl", "jsd")
DECAYS = ("none", "linear", "cosine")
HIDDEN_LOSSES = ("mse", "cosine")
TEACHER_TARGETS = ("online", "offline")


def _check_loss_args(loss: str, temperature: float, beta: float, chunk_size: int) -> None:
    if loss not in LOSSES:
        raise ConfigError("kd.loss", f"unknown KD loss {loss!r}.", f"use one of {', '.join(LOSSES)}.")
    if not 0 < temperature < math.inf:
        raise ConfigError("kd.temperature", f"must be > 0 and finite, got {temperature}.", "e.g. 1.0.")
    if not 0 < beta < 1:
        raise ConfigError("kd.beta", f"JSD beta must be in (0, 1), got {beta}.", "e.g. 0.5 (symmetric JSD).")
    if chunk_size < 1:
        raise ConfigError("kd.chunk_size", f"must be >= 1 token, got {chunk_size}.", "e.g. 1024.")


@dataclass
class KDConfig:
    loss: str = "forward_kl"  # "forward_kl" | "reverse_kl" | "jsd"
    temperature: float = 1.0
    beta: float = 0.5  # JSD only: teacher weight in the mixture
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    # KD is on for global_step < stop_step (0 = never on), or stops at round(stop_fraction * max_steps);
    # at most one of the two; neither = KD for the whole run. (typing.Optional for OmegaConf, as asked.)
    stop_step: Optional[int] = None  # noqa: UP045
    stop_fraction: Optional[float] = None  # noqa: UP045
    decay: str = "none"  # "none" | "linear" | "cosine": kd_weight decays to 0 at the stop step
    chunk_size: int = 1024  # tokens per chunk of the loss computation
    # Internal KD (distill/kd/internal.py), on while KD is on, each scaled by the KD weight of the step:
    router_weight: float = 0.0  # KL(teacher router || student router) at mapped MoE layers (0 = off)
    hidden_weight: float = 0.0  # student -> teacher block-output distance at mapped blocks (0 = off)
    hidden_loss: str = "mse"  # "mse" | "cosine"
    # one teacher MoE-layer index (0-based among the teacher's MoE layers) per student MoE layer;
    # null = the deepest teacher MoE layers, in order (the Mixture-of-Students mapping)
    layer_map: Optional[List[int]] = None  # noqa: UP006, UP045
    teacher_targets: str = "online"  # "online" (the teacher runs) | "offline" (stored top-k targets)
    topk: int = 32  # offline targets: teacher log-probabilities kept per token
    targets_dtype: str = "float16"  # offline targets: the stored log-probabilities' dtype ("float32": exact)
    router_topk: int = 4  # offline targets: router entries kept per token and MoE layer (router KD reads them)

    def __post_init__(self) -> None:
        _check_loss_args(self.loss, self.temperature, self.beta, self.chunk_size)
        for key in ("kd_weight", "ce_weight"):
            value = getattr(self, key)
            if not 0 <= value < math.inf:
                raise ConfigError(f"kd.{key}", f"must be >= 0 and finite, got {value}.")
        self._check_internal()
        if self.stop_step is not None and self.stop_fraction is not None:
            raise ConfigError(
                "kd.stop_fraction",
                f"both kd.stop_step ({self.stop_step}) and kd.stop_fraction ({self.stop_fraction}) are set.",
                "set one of them to null.",
            )
        if self.stop_step is not None and self.stop_step < 0:
            raise ConfigError(
                "kd.stop_step", f"must be >= 0, got {self.stop_step}.", "0 means KD never runs."
            )
        if self.stop_fraction is not None and not 0 < self.stop_fraction <= 1:
            raise ConfigError(
                "kd.stop_fraction",
                f"must be in (0, 1], got {self.stop_fraction}.",
                "e.g. 0.7; for no KD at all use kd.stop_step=0 (kd=none).",
            )
        if self.decay not in DECAYS:
            raise ConfigError(
                "kd.decay", f"unknown decay {self.decay!r}.", f"use one of {', '.join(DECAYS)}."
            )
        if self.decay != "none" and self.stop_step is None and self.stop_fraction is None:
            raise ConfigError(
                "kd.decay",
                f"decay {self.decay!r} goes to 0 at the KD stop step, but no stop step is set.",
                "set kd.stop_step or kd.stop_fraction, or kd.decay=none.",
            )


    def _check_internal(self) -> None:
        """Checks of the internal-KD and teacher-target keys."""
        for key in ("router_weight", "hidden_weight"):
            value = getattr(self, key)
            if not 0 <= value < math.inf:
                raise ConfigError(f"kd.{key}", f"must be >= 0 and finite, got {value}.", "0 turns the term off.")
        for key, value, choices in (("hidden_loss", self.hidden_loss, HIDDEN_LOSSES),
                                    ("teacher_targets", self.teacher_targets, TEACHER_TARGETS)):
            if value not in choices:
                raise ConfigError(f"kd.{key}", f"unknown value {value!r}.", f"use one of {', '.join(choices)}.")
        if self.layer_map is not None:
            self.layer_map = list(self.layer_map)
            bad = [i for i in self.layer_map if not isinstance(i, int) or isinstance(i, bool) or i < 0]
            if bad:
                raise ConfigError("kd.layer_map", f"entries must be integers >= 0 (teacher MoE-layer indices), "
                                  f"got {bad}.", "null maps to the deepest teacher MoE layers.")
        if not isinstance(self.topk, int) or isinstance(self.topk, bool) or self.topk < 1:
            raise ConfigError("kd.topk", f"must be an integer >= 1, got {self.topk!r}.", "e.g. 32.")
        if not isinstance(self.router_topk, int) or isinstance(self.router_topk, bool) or self.router_topk < 1:
            raise ConfigError("kd.router_topk", f"must be an integer >= 1, got {self.router_topk!r}.",
                              "e.g. 4; the teacher's expert count stores whole router distributions.")
        if self.targets_dtype not in ("float16", "float32"):
            raise ConfigError("kd.targets_dtype", f"unknown dtype {self.targets_dtype!r}.", "use float16 or float32.")
        if self.teacher_targets == "offline" and self.hidden_weight > 0:
            raise ConfigError("kd.teacher_targets", "offline targets hold the teacher's top-k logits and routes, "
                              "not its hidden states: hidden-state KD needs the teacher online.",
                              "use kd.teacher_targets=online, or kd.hidden_weight=0.")


class KDSchedule:
    """When KD is on and with what weight, per optimizer step (0-based `global_step`).

    `max_steps` is trainer.max_steps; None or negative (Lightning's "no limit") is allowed unless
    kd.stop_fraction needs it. Raises ConfigError when the stop step does not fit `max_steps`.
    """

    def __init__(self, cfg: KDConfig, max_steps: int | None):
        self.cfg = cfg
        self.max_steps = max_steps if max_steps is not None and max_steps >= 0 else None
        if cfg.stop_step is not None:
            stop, key = cfg.stop_step, "kd.stop_step"
        elif cfg.stop_fraction is not None:
            if self.max_steps is None:
                raise ConfigError(
                    "kd.stop_fraction",
                    "a fraction of the run needs trainer.max_steps, which is not set.",
                    "set trainer.max_steps, or use kd.stop_step.",
                )
            stop, key = round(cfg.stop_fraction * self.max_steps), "kd.stop_fraction"
        else:
            stop, key = None, ""
        if stop is not None and self.max_steps is not None and stop > self.max_steps:
            raise ConfigError(
                key,
                f"KD stop step beyond trainer.max_steps ({stop} > {self.max_steps}).",
                "lower the KD stop step or raise trainer.max_steps (null stop = KD all the way).",
            )
        self.stop_step: int | None = stop

    @property
    def uses_teacher(self) -> bool:
        """False iff the stop step is 0: KD is never on, so the teacher is never needed."""
        return self.stop_step != 0

    def active(self, step: int) -> bool:
        """Whether the KD term (and the teacher) is used at this optimizer step."""
        return self.stop_step is None or step < self.stop_step

    def weight(self, step: int) -> float:
        """The KD weight at this step: kd_weight, decayed to 0 at the stop step; 0 when inactive."""
        if not self.active(step):
            return 0.0
        w = self.cfg.kd_weight
        if self.cfg.decay == "none":
            return w
        frac = step / self.stop_step  # decay != "none" implies a stop step (checked in KDConfig)
        if self.cfg.decay == "linear":
            return w * (1.0 - frac)
        return w * 0.5 * (1.0 + math.cos(math.pi * frac))
