"""One error type for bad input: it names the config key (or file) to fix."""

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


def exit_on_config_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an entry point: a ConfigError prints one clear line to stderr and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            print(f"distill: error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
