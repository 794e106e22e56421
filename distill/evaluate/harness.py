"""lm-evaluation-harness on an exported model: task names checked, `simple_evaluate` through lm-eval's `HFLM`.

Written against lm-eval 0.4.13 (`lm_eval.simple_evaluate`, `lm_eval.models.huggingface.HFLM`,
`lm_eval.tasks.TaskManager(include_path=...)`) and transformers 5.24. The model is loaded by lm-eval itself from
the transformers directory (`trust_remote_code=True`: a model without a transformers family ships its code).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

from distill.errors import ConfigError


def task_manager(include_path: str | Path | None = None, defaults: bool = True) -> Any:
    """lm-eval's task index: its own tasks (``defaults``; indexing them takes seconds) and ``include_path``'s."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path is not None else None,
                       include_defaults=defaults)


def check_tasks(names: list[str], known: list[str], key: str = "eval.tasks") -> None:
    """ConfigError naming ``key`` for a task lm-eval does not know (with the closest names)."""
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(key, f"lm-eval has no task {name!r}.",
                              f"{hint}`python -m lm_eval ls tasks` lists them; `paper` is the DeepSpeed-MoE paper's six.")


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def metrics_of(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from `simple_evaluate`'s results ("acc,none" -> "acc"; stderrs kept)."""
    out: dict[str, dict[str, float]] = {}
    for task, row in (results.get("results") or {}).items():
        values = {}
        for k, v in row.items():
            name, _, filt = k.partition(",")
            if _number(v) is not None and name not in ("alias", "sample_len"):
                values[name if filt in ("", "none") else f"{name}[{filt}]"] = _number(v)
        out[task] = values
    return out


def run_harness(hf_dir: str | Path, tasks: list[str], *, include_path: str | Path | None, num_fewshot: int | None,
                limit: float | None, batch_size: int, device: str, seed: int = 0) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` of the transformers directory ``hf_dir`` on ``tasks``. Returns
    {"metrics": {task: {metric: value}}, "n_samples": {task: n}, "versions": {...}, "config": {...}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(hf_dir), trust_remote_code=True, device=device, dtype="float32",
              batch_size=batch_size)
    limit_arg: int | float | None = int(limit) if limit is not None and limit >= 1 else limit
    own = {p.stem for p in Path(include_path).glob("*.yaml")} if include_path is not None else set()
    manager = task_manager(include_path, defaults=bool(set(tasks) - own))
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit_arg,
                                      task_manager=manager, log_samples=False,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, bootstrap_iters=0)
    if results is None:  # only rank 0 gets results
        return {"metrics": {}, "n_samples": {}}
    n = {t: v.get("effective", v.get("original")) if isinstance(v, dict) else v
         for t, v in (results.get("n-samples") or {}).items()}
    return {"metrics": metrics_of(results), "n_samples": n, "versions": results.get("versions", {}),
            "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None}
