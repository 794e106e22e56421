"""What a run directory records about the run: `run_info.json` (the per-step losses, `losses.jsonl`, are
written by `distill.train.loss_log.StepLossRecorder`).

`run_info.json` (rank 0, each stage's out_dir, rewritten at each start): the resolved config, the git
commit of the code (and whether the tree had local changes), package versions, the corpus, tokenizer and
teacher fingerprints, the checkpoint the run resumed from, and the earlier starts in the same directory
(a requeued or resumed job keeps its history).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only

RUN_INFO = "run_info.json"
PACKAGES = ("distill", "torch", "lightning", "hydra-core", "omegaconf", "datasets", "tokenizers", "transformers",
            "safetensors", "numpy", "wandb")


def git_state(path: Path | None = None) -> dict[str, Any]:
    """{"commit", "dirty"} of the git checkout holding ``path`` (this package by default); None outside one."""
    root = path or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def data_fingerprints(dm: Any) -> dict[str, Any]:
    """The corpus, tokenizer and packed-data fingerprints of a set-up `LMDataModule`."""
    from distill.data import corpus_fingerprint

    return {
        "fingerprint": dm.fingerprint,
        "corpus": corpus_fingerprint(dm.corpus) if dm.corpus is not None else None,
        "tokenizer": dm.tokenizer.fingerprint if dm.tokenizer is not None else None,
        "vocab_size": dm.vocab_size,
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@rank_zero_only
def write_run_info(out_dir: str | os.PathLike, config: dict[str, Any], *, data: Any = None, teacher: dict[str, str] | None = None,
                   resumed_from: str | os.PathLike | None = None) -> Path:
    """Write ``<out_dir>/run_info.json`` (rank 0) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_INFO
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    git = git_state()
    attempts: list[dict[str, Any]] = []
    if path.is_file():
        try:
            attempts = list(json.loads(path.read_text()).get("attempts", []))
        except (OSError, ValueError):
            attempts = []
    attempts.append({"started": started, "resumed_from": str(resumed_from) if resumed_from else None,
                     "git_commit": git["commit"], "host": socket.gethostname()})
    info = {
        "stage": config.get("stage"),
        "started": started,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "command": [sys.executable, *sys.argv],
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "git": git,
        "packages": package_versions(),
        "data": data_fingerprints(data) if data is not None else None,
        "teacher": teacher,
        "config": config,
        "attempts": attempts,
    }
    _write_atomic(path, json.dumps(info, indent=2, sort_keys=False, default=str) + "\n")
    return path
