"""Hydra's errors as one-line `ConfigError`s, and the start of every app.

`run_app(main, app)` starts a Hydra app so that Hydra's own composition errors (an unknown key, a value
of the wrong type, a config group option that does not exist, an unparsable override) become the same
one-line `ConfigError` message with exit status 2 instead of Hydra's report, and a NaN/Inf in training
exits with status 3 and one line. `check_known_keys` rejects keys the schema does not have (Hydra lets
``+key=value`` add one anywhere). Nothing here checks a value: the dataclasses do (distill/config.py).

Importing this module registers the apps' OmegaConf resolver ``${distill.gpus:<accelerator>,<devices>}``
(`gpus_for`), which the SLURM launcher config uses; every app imports this module before Hydra composes.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ConfigTypeError, OmegaConfBaseException, ValidationError

from distill.config import schema_of
from distill.errors import ConfigError, NonFiniteError, with_fix

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Accelerators that run on GPUs ("auto" picks them whenever the node has any, so it asks for them).
GPU_ACCELERATORS = ("gpu", "cuda", "auto")


def gpus_for(accelerator: Any, devices: Any) -> Any:
    """GPUs per node a job should request: ``devices`` for a GPU accelerator (or auto), None otherwise.

    The resolver ``${distill.gpus:${trainer.accelerator},${trainer.devices}}`` of
    conf/hydra/launcher/submitit_slurm.yaml: SLURM refuses ``--gpus-per-node`` on a node without GPUs
    ("Invalid generic resource (gres) specification"), and a CPU job has no use for them. Hydra resolves
    the launcher config once, in the submitting process, so submitted jobs never need the resolver.
    """
    return devices if str(accelerator).strip().lower() in GPU_ACCELERATORS else None


OmegaConf.register_new_resolver("distill.gpus", gpus_for, replace=True)


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


def suggest_key(name: str, choices: list[str], parent: str) -> str:
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
                              f"{suggest_key(str(key), list(hints), prefix.rstrip('.'))} Remove or rename it.")
        sub = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            check_known_keys(value, sub, f"{full}.")


def groups_with_key(group: str, key: str) -> list[str]:
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
                fix = suggest_key(name, list(typing.get_type_hints(owner)), parent)
            else:
                options = groups_with_key(parent, name) if parent else []
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
# starting an app


def _fail(err: BaseException, status: int, all_ranks: bool = True) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if all_ranks or rank_zero_only.rank == 0:
        print(f"distill: error: {err}", file=sys.stderr, flush=True)
    sys.exit(status)


def run_app(main: Callable[[], Any], app: str) -> None:
    """Run the Hydra entry point ``main`` of ``app``: bad config -> one line and exit 2; NaN/Inf -> exit 3."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    # Hydra prints its composition errors itself and exits 1 unless this is set; then they reach us.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except ConfigError as err:
        _fail(with_fix(err), 2)
    except NonFiniteError as err:
        _fail(err, 3, all_ranks=False)
    except (ConfigCompositionException, MissingConfigException, OverrideParseException, OmegaConfBaseException) as err:
        _fail(config_error_from_hydra(err, schema_of(app, sys.argv[1:])), 2)
