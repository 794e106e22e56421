"""Start a small torch.distributed job on this machine: one subprocess per rank, hard-killed on timeout.

For tests and benchmarks (training runs use Lightning's launchers or a cluster's). A process stuck in
a gloo collective ignores SIGTERM, so every rank runs in its own process group and a timeout sends
SIGKILL to all of them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: Mapping[str, object] | None = None, threads: int = 1) -> dict[str, str]:
    """This process's environment without its own rank variables, plus `extra`, with `threads` OpenMP
    threads (several ranks share a few cores; more threads each would oversubscribe them)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = str(threads)
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def run_processes(
    cmds: Sequence[tuple[Sequence[str], Mapping[str, str]]], timeout: float, cwd: str | Path | None = None
) -> list[tuple[int, str]]:
    """Run the commands at once; SIGKILL every one (and its children) when `timeout` seconds have passed.
    Returns (exit status, stdout+stderr) per command; -9 for a killed one."""
    procs = [
        subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
        for cmd, env in cmds
    ]
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        results.append((proc.returncode, out))
    return results


def run_ranks(
    argv: Sequence[str], world: int, timeout: float, threads: int = 1, cwd: str | Path | None = None
) -> list[tuple[int, str]]:
    """`argv` once per rank of a `world`-rank job on 127.0.0.1 (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_* set)."""
    port = free_port()
    return run_processes(
        [
            (argv, child_env({"RANK": r, "LOCAL_RANK": r, "NODE_RANK": 0, "WORLD_SIZE": world,
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, threads))
            for r in range(world)
        ],
        timeout,
        cwd,
    )
