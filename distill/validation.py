"""Whole-config validation, before any data is built or a step is trained.

Every app calls `validate_config(cfg, app)` first thing after Hydra composes its config. It reuses the
components' own checks (`ModelConfig.validate` with `MoEConfig.validate`, `KDConfig` and `KDSchedule`,
data `validate`, the Mixture-of-Students derivation, the expert-parallel layout checks) and adds what no
component owns: keys that are not in the schema, the trainer / optimiser / checkpoint / resume values,
the teacher's presence, and the strategy's arguments. Each failure is a `ConfigError(key, problem, fix)`.

The teacher's vocabulary can only be compared with the data's once the tokenizer exists:
`check_teacher_vocab` runs right after the data is prepared, still before training.

`run_app(main, app)` starts a Hydra app so that Hydra's own composition errors (an unknown key, a value
of the wrong type, a config group option that does not exist, an unparsable override) become the same
one-line `ConfigError` message with exit status 2 instead of Hydra's report, and a NaN/Inf in training
exits with status 3 and one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ConfigTypeError, OmegaConfBaseException, ValidationError

from distill.config import DistillConfig, PipelineConfig, PretrainConfig
from distill.errors import ConfigError
from distill.models import ModelConfig

SCHEMAS: dict[str, type] = {"pretrain": PretrainConfig, "distill": DistillConfig, "pipeline": PipelineConfig}
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
STUDENT_INITS = ("scratch", "teacher")


# Remedies for the component checks that state only the problem (their modules could carry them at the source).
FIXES = {
    "model.moe.top_k": "lower model.moe.top_k, or give every MoE layer at least that many experts (model.num_experts).",
    "model.num_experts": "give every MoE layer at least one expert, e.g. model.num_experts=[4,8].",
    "model.n_heads": "pick model.n_heads so that model.d_model / model.n_heads is even.",
    "student.depth_ratio": "e.g. student.depth_ratio=0.875 (the paper's 24 -> 21 layers), or set student.n_layers.",
    "strategy.ep_size": "e.g. strategy.ep_size=2; it must divide trainer.devices x trainer.num_nodes.",
    "data.val_fraction": "e.g. 0.05; data.val_fraction + data.test_fraction must leave documents to train on.",
    "data.test_fraction": "e.g. 0.05; data.val_fraction + data.test_fraction must leave documents to train on.",
    "kd.kd_weight": "e.g. kd.kd_weight=1.0 (0 turns the KD term off).",
    "kd.ce_weight": "e.g. kd.ce_weight=1.0.",
}


def validate_config(cfg: DictConfig, app: str) -> None:
    """Raise ConfigError naming the first bad key of the composed config of ``app`` (pretrain, distill,
    pipeline), with a fix (a component's error that has none gets one here)."""
    try:
        _validate(cfg, app)
    except ConfigError as err:
        if err.fix:
            raise
        fix = FIXES.get(err.key, f"change `{err.key}` to a value the problem above allows "
                                 "(`--cfg job` prints the composed config).")
        raise ConfigError(err.key, err.problem, fix) from None


def _validate(cfg: DictConfig, app: str) -> None:
    from distill.data.config import to_data_config
    from distill.data.config import validate as validate_data
    from distill.kd import KDSchedule, as_kd_config
    from distill.models import load_model_config
    from students.mos import derive_student

    check_known_keys(OmegaConf.to_container(cfg, resolve=False), SCHEMAS[app])
    check_strategy_arguments(cfg.strategy)
    check_trainer(cfg.trainer)
    check_optim(cfg.optim)
    if cfg.checkpoint.every_n_steps < 1:
        raise ConfigError("checkpoint.every_n_steps", f"must be >= 1, got {cfg.checkpoint.every_n_steps}.",
                          "e.g. checkpoint.every_n_steps=100.")
    check_resume(cfg.resume, app)
    validate_data(to_data_config(cfg.data))

    models: list[ModelConfig] = []
    if app in ("pretrain", "pipeline"):
        models.append(load_model_config(cfg.model))
    if app in ("distill", "pipeline"):
        KDSchedule(as_kd_config(cfg.kd), cfg.trainer.max_steps)  # kd.* and the stop step vs trainer.max_steps
        if app == "distill" or cfg.teacher.path is not None:
            models.insert(0, teacher_architecture(cfg.teacher))
        student = OmegaConf.to_object(cfg.student)
        if student.init not in STUDENT_INITS:
            raise ConfigError("student.init", f"unknown value {student.init!r}.",
                              f"use one of {', '.join(STUDENT_INITS)}.")
        models.append(derive_student(models[0], student))  # depth, expert counts, top_k vs experts
    if app == "pipeline":
        check_pipeline(cfg)
    check_expert_parallel(cfg, models)


# ----------------------------------------------------------------------------------------------------
# keys and types against the schema


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def field_type(schema: type, key: str) -> Any:
    """The annotated type of ``key`` (dotted, list indices allowed) in the dataclass ``schema``; None if unknown."""
    tp: Any = schema
    for part in re.sub(r"\[\d+\]", ".[]", key).split("."):
        tp = _unwrap_optional(tp)
        if part == "[]":
            args = typing.get_args(tp)
            tp = args[0] if args else Any
        elif dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return None
            tp = hints[part]
        else:
            return None
    return tp


def field_default(schema: type, key: str) -> Any:
    """The dataclass default of ``key`` (dotted) in ``schema``, or None."""
    parent, _, name = key.rpartition(".")
    owner = _unwrap_optional(field_type(schema, parent)) if parent else schema
    if not dataclasses.is_dataclass(owner):
        return None
    for f in dataclasses.fields(owner):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    return None


def describe_type(tp: Any) -> str:
    """`int` -> "an integer", `Optional[float]` -> "a number or null", `List[int]` -> "a list of integers"."""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    inner = _unwrap_optional(tp)
    optional = inner is not tp
    if inner in names:
        text = names[inner]
    elif typing.get_origin(inner) in (list, typing.List):  # noqa: UP006
        args = typing.get_args(inner)
        elem = names.get(args[0], "values") if args else "values"
        text = "a list of " + (elem.split(" ", 1)[1] + "s" if elem in names.values() else elem)
    elif dataclasses.is_dataclass(inner):
        text = f"a `{inner.__name__}` node"
    else:
        text = "any value"
    return text + (" or null" if optional else "")


def _suggest(name: str, choices: list[str], parent: str) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    where = f"`{parent}`" if parent else "the top level"
    if close:
        return f"did you mean `{parent + '.' if parent else ''}{close[0]}`?"
    return f"the keys of {where} are: {', '.join(sorted(choices))}."


def check_known_keys(node: dict[str, Any], schema: type, prefix: str = "") -> None:
    """ConfigError for a key the schema does not have (Hydra lets `+key=value` add one anywhere)."""
    hints = typing.get_type_hints(schema)
    for key, value in node.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(full, "is not a config key.",
                              f"{_suggest(str(key), list(hints), prefix.rstrip('.'))} Remove or rename it.")
        sub = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            check_known_keys(value, sub, f"{full}.")


def _groups_with_key(group: str, key: str) -> list[str]:
    """The options of config group ``group`` (conf/<group>/*.yaml) that define ``key``."""
    found = []
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        try:
            if key in (OmegaConf.load(path) or {}):
                found.append(path.stem)
        except Exception:  # an unreadable option is not this check's business
            continue
    return found


def config_error_from_hydra(err: BaseException, schema: type) -> ConfigError:
    """Hydra's / OmegaConf's error for a bad override or config -> a ConfigError naming the key and the fix."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(err, MissingConfigException):
        missing = err.missing_cfg_file or ""
        group, _, option = missing.rpartition("/")
        options = list(err.options or [])
        return ConfigError(group or missing, f"there is no config {option or missing!r} in group `{group}`.",
                           f"use one of: {', '.join(options)}." if options else f"see {CONF_DIR / group}.")
    if isinstance(err, OverrideParseException):
        key = (err.override or "").split("=", 1)[0].lstrip("+~") or "overrides"
        reason = (err.message or "").strip().splitlines()
        return ConfigError(key, f"cannot parse the override {err.override!r} ({reason[0] if reason else 'syntax'}).",
                           "write key=value; quote values holding spaces, brackets or '='.")
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        key = str(cause.full_key)
        msg = str(cause.msg or "").strip().splitlines()[0] if cause.msg else ""
        if isinstance(cause, ConfigKeyError) or "not in struct" in msg or " not in " in msg:
            parent, _, name = key.rpartition(".")
            owner = _unwrap_optional(field_type(schema, parent)) if parent else schema
            if dataclasses.is_dataclass(owner):
                fix = _suggest(name, list(typing.get_type_hints(owner)), parent)
            else:
                options = _groups_with_key(parent, name) if parent else []
                fix = (f"`{name}` belongs to {' / '.join(f'{parent}={o}' for o in options)}: select it first, "
                       f"e.g. `{parent}={options[0]} {key}=...`." if options
                       else f"`{parent}` has no `{name}`; check the spelling or add it with `+{key}=...`.")
            return ConfigError(key, "is not a config key.", fix)
        if isinstance(cause, (ValidationError, ConfigTypeError)):
            tp = field_type(schema, key)
            wanted = describe_type(tp) if tp is not None else "another type"
            if "not Optional" in msg:
                problem = "cannot be null."
            elif "does not support deletion" in msg:
                return ConfigError(key, "cannot be deleted (the schema requires it).",
                                   f"set a value instead, e.g. {_example(schema, key)}.")
            else:
                problem = f"{msg[0].lower() + msg[1:] if msg else 'has the wrong type'}; the schema wants {wanted}."
            return ConfigError(key, problem, f"give it {wanted}, e.g. {_example(schema, key)}.")
        return ConfigError(key, msg or type(cause).__name__, "fix this value on the command line or in conf/.")
    lines = str(err).strip().splitlines()
    return ConfigError("overrides", lines[0] if lines else type(err).__name__,
                       "check the command-line overrides (`--cfg job` prints the composed config).")


def _example(schema: type, key: str) -> str:
    """``key=<its schema default>`` (for a list element: the whole list)."""
    base = re.sub(r"\[\d+\]$", "", key)
    default = field_default(schema, base)
    if isinstance(default, bool):
        value = str(default).lower()
    elif isinstance(default, list):
        value = "[" + ",".join(str(v) for v in default) + "]" if default else "[1,2]"
    else:
        value = "null" if default is None else str(default)
    return f"{base}={value}"


# ----------------------------------------------------------------------------------------------------
# values no component owns


def check_trainer(t: Any) -> None:
    """The `trainer` node."""
    if not isinstance(t.max_steps, int) or t.max_steps < 1:
        raise ConfigError("trainer.max_steps", f"must be >= 1, got {t.max_steps}.",
                          "the learning-rate schedule and kd.stop_fraction need a finite run, e.g. 300.")
    devices = t.devices
    if isinstance(devices, int) and (devices == 0 or devices < -1):
        raise ConfigError("trainer.devices", f"must be >= 1, -1 (all) or auto, got {devices}.", "e.g. trainer.devices=1.")
    if isinstance(devices, str) and devices != "auto" and not re.fullmatch(r"-?\d+|(\d+,)*\d+,?", devices):
        raise ConfigError("trainer.devices", f"cannot read {devices!r} as a device count or list.",
                          "use an integer, a list such as [0,1], or auto.")
    for key, low in (("num_nodes", 1), ("val_check_interval", 1), ("log_every_n_steps", 1),
                     ("accumulate_grad_batches", 1), ("limit_val_batches", 0)):
        value = getattr(t, key)
        if value < low:
            raise ConfigError(f"trainer.{key}", f"must be >= {low}, got {value}.", f"e.g. trainer.{key}={max(low, 1)}.")
    if t.gradient_clip_val is not None and not 0 <= t.gradient_clip_val < math.inf:
        raise ConfigError("trainer.gradient_clip_val", f"must be >= 0 and finite, or null, got {t.gradient_clip_val}.",
                          "e.g. 1.0 (null: no clipping).")


def check_optim(o: Any) -> None:
    """The `optim` node (AdamW + warm-up/cosine schedule + MoE loss coefficients)."""
    if not 0 < o.lr < math.inf:
        raise ConfigError("optim.lr", f"must be > 0 and finite, got {o.lr}.", "e.g. optim.lr=3e-4.")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}.", "e.g. 0.1.")
    if o.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}.", "e.g. 30.")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(o, key) < 1:
            raise ConfigError(f"optim.{key}", f"must be in [0, 1), got {getattr(o, key)}.", "e.g. 0.9 and 0.95.")
    if not o.eps > 0:
        raise ConfigError("optim.eps", f"must be > 0, got {o.eps}.", "e.g. 1e-8.")
    for key in ("weight_decay", "aux_coef", "z_coef"):
        if not 0 <= getattr(o, key) < math.inf:
            raise ConfigError(f"optim.{key}", f"must be >= 0 and finite, got {getattr(o, key)}.", "0 turns it off.")


def check_resume(resume: str | None, app: str) -> None:
    """`resume`: auto (default), never (or null), or the path of a checkpoint (not for the pipeline)."""
    from distill.checkpointing import AUTO, FRESH

    if resume is None or resume in AUTO or str(resume).lower() in FRESH:
        return
    if app == "pipeline":
        raise ConfigError("resume", f"the pipeline runs several stages; one checkpoint path ({resume}) cannot "
                          "resume them all.", "use resume=auto (each stage continues from its own checkpoints) "
                          "or resume=never.")
    if not Path(resume).expanduser().is_file():
        raise ConfigError("resume", f"no checkpoint at {resume}.",
                          "use resume=auto (<out_dir>/checkpoints/last.ckpt when it exists), resume=never, "
                          "or the path of a .ckpt file.")


def check_pipeline(cfg: Any) -> None:
    if cfg.teacher_max_steps is not None and cfg.teacher_max_steps < 1:
        raise ConfigError("teacher_max_steps", f"must be >= 1 or null, got {cfg.teacher_max_steps}.",
                          "null: the teacher trains for trainer.max_steps.")
    for key in ("gen_tokens", "gen_batch"):
        if getattr(cfg, key) < 1:
            raise ConfigError(key, f"must be >= 1, got {getattr(cfg, key)}.", f"e.g. {key}=4.")


# ----------------------------------------------------------------------------------------------------
# teacher


def teacher_architecture(teacher: Any) -> ModelConfig:
    """The configured teacher's architecture (its config only; the weights are read later)."""
    if teacher.kind not in ("native", "hf"):
        raise ConfigError("teacher.kind", f"unknown teacher kind {teacher.kind!r}.",
                          "use teacher=native (an export dir or .ckpt of distill.pretrain) or teacher=hf.")
    if teacher.path is None:
        raise ConfigError("teacher.path", "no teacher given.",
                          "set teacher.path=<export dir or .ckpt> (python -m distill.pretrain writes <run dir>/export), "
                          "or teacher=hf teacher.path=<Hugging Face dir or hub id>.")
    if teacher.kind == "hf":
        from teachers.hf import read_hf_teacher_config

        return read_hf_teacher_config(teacher.path)
    from teachers.native import read_native_teacher_config

    return read_native_teacher_config(teacher.path)


def check_teacher_vocab(teacher_path: str | os.PathLike, teacher_cfg: ModelConfig, tokenizer: Any) -> None:
    """The data's tokenizer must be the teacher's: the same token -> id map (the teacher may only have
    extra padding rows); compared entry by entry when the teacher's export holds its tokenizer.json."""
    from tokenizers import Tokenizer

    from distill.export import TOKENIZER

    fix = (f"use the teacher's tokenizer: data.tokenizer.kind=pretrained "
           f"data.tokenizer.path={Path(teacher_path) / TOKENIZER} (or the data.tokenizer settings it was pretrained with).")
    if teacher_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError("data.tokenizer", f"the teacher's vocabulary ({teacher_cfg.vocab_size}) is smaller than the "
                          f"data tokenizer's ({tokenizer.vocab_size}): teacher and student must share the vocabulary.", fix)
    file = Path(teacher_path).expanduser() / TOKENIZER
    if not file.is_file():
        return
    theirs = Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)
    ours = tokenizer.backend.get_vocab(with_added_tokens=True)
    if theirs != ours:
        differ = len(set(theirs.items()) ^ set(ours.items())) // 2 or abs(len(theirs) - len(ours))
        raise ConfigError("data.tokenizer", f"the data's tokenizer ({len(ours)} entries) is not the teacher's "
                          f"({len(theirs)} entries, {file}): about {differ} token ids differ, so the KD term would "
                          "compare different tokens.", fix)


# ----------------------------------------------------------------------------------------------------
# strategy and expert parallelism


def _accepted_arguments(target: Any) -> set[str] | None:
    """Keyword arguments ``target`` (a class or function) accepts; None when it takes arbitrary ones."""
    if not inspect.isclass(target):
        params = inspect.signature(target).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return {p.name for p in params}
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    accepted: set[str] = set()
    for cls in target.__mro__:
        if "__init__" not in vars(cls):
            continue
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        accepted |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return accepted
        if cls is DDPStrategy:  # DDPStrategy's **kwargs go to torch's DistributedDataParallel
            ddp = list(inspect.signature(DistributedDataParallel.__init__).parameters)[2:]  # self, module
            return accepted | set(ddp)
    return None


def check_strategy_arguments(strategy: Any) -> None:
    """A `strategy` node with `_target_`: the target imports and takes every key given."""
    if not isinstance(strategy, DictConfig) or "_target_" not in strategy:
        return
    from hydra.utils import get_object

    target = strategy._target_
    try:
        obj = get_object(target)
    except Exception as err:
        raise ConfigError("strategy._target_", f"cannot import {target!r} ({err}).",
                          "select a config of conf/strategy/ (auto, ddp, expert_parallel) or an importable class.") from None
    accepted = _accepted_arguments(obj)
    if accepted is None:
        return
    for key in strategy:
        if str(key).startswith("_") or key in accepted:
            continue
        options = _groups_with_key("strategy", str(key))
        fix = (f"`{key}` belongs to strategy={options[0]}: select it (strategy={options[0]} strategy.{key}=...)."
               if options else _suggest(str(key), sorted(accepted), "strategy"))
        raise ConfigError(f"strategy.{key}", f"is not an argument of {target}.", fix)


def world_size(trainer: Any) -> int | None:
    """trainer.devices x trainer.num_nodes, or None when the device count is only known at launch (auto, -1)."""
    devices = trainer.devices
    if isinstance(devices, str) and re.fullmatch(r"\d+", devices):
        devices = int(devices)
    elif isinstance(devices, str) and "," in devices:
        devices = [d for d in devices.split(",") if d]
    if isinstance(devices, int) and devices >= 1:
        return devices * trainer.num_nodes
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices) * trainer.num_nodes
    return None


def check_expert_parallel(cfg: Any, models: list[ModelConfig]) -> None:
    """strategy.ep_size divides the world size, and every MoE layer's experts split over its group."""
    strategy = cfg.strategy
    if not isinstance(strategy, DictConfig) or "ep_size" not in strategy:
        return
    from distill.parallel.groups import check_world, layer_group_size

    world = world_size(cfg.trainer)
    ep = strategy.ep_size
    if ep is None:  # the strategy's default: the processes of one node
        if world is None:
            return
        ep = world // cfg.trainer.num_nodes
    if world is None:
        if not isinstance(ep, int) or ep < 1:
            check_world(1, ep)  # the type / range message
        return
    check_world(world, ep)
    for model in models:
        for experts in model.num_experts:
            layer_group_size(experts, ep, what=f"a MoE layer of {model.name}")


# ----------------------------------------------------------------------------------------------------
# starting an app


def _fail(err: BaseException, status: int, all_ranks: bool = True) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if all_ranks or rank_zero_only.rank == 0:
        print(f"distill: error: {err}", file=sys.stderr, flush=True)
    sys.exit(status)


def run_app(main: Callable[[], Any], app: str) -> None:
    """Run the Hydra entry point ``main`` of ``app``: bad config -> one line and exit 2; NaN/Inf -> exit 3."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    from distill.checkpointing import NonFiniteError

    # Hydra prints its composition errors itself and exits 1 unless this is set; then they reach us.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except ConfigError as err:
        _fail(err, 2)
    except NonFiniteError as err:
        _fail(err, 3, all_ranks=False)
    except (ConfigCompositionException, MissingConfigException, OverrideParseException, OmegaConfBaseException) as err:
        _fail(config_error_from_hydra(err, SCHEMAS[app]), 2)
