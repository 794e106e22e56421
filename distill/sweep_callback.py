"""The Hydra callback of the apps (``hydra.callbacks.sweep``) that keeps cluster sweeps consistent.

:class:`SweepCallback` checks a submitit launcher against the trainer before any job is submitted
(`check_launcher`), sets up torch.distributed for multi-task local jobs (`export_local_task_env`), keeps a
task that SLURM terminates from reporting a result (`watch_slurm_termination`), and writes the sweep report
(`distill.sweep.write_sweep_report`) when a multirun ends.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from distill.errors import ConfigError, exit_on_config_error
from distill.sweep import write_sweep_report

log = logging.getLogger(__name__)


class SweepCallback(Callback):
    """Hydra callback of the apps (``hydra.callbacks.sweep``); harmless outside submitit sweeps."""

    _sigterm: tuple[threading.Event, Any] | None = None  # in a SLURM task: (received, the handler replaced)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        # Hydra turns a callback's exception into a warning; a SystemExit stops the sweep before any job.
        exit_on_config_error(check_launcher)(config)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        export_local_task_env()
        self._sigterm = watch_slurm_termination()

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        """A task that SLURM sent SIGTERM (requeue, preemption, cancellation) exits here without a result.

        SLURM signals every process of the job step, wandb's service among them, so the interrupted job
        usually ends in an exception; submitit would pickle it as the job's result and the sweep would fail
        at once, although SLURM runs the job again and the next attempt resumes from its checkpoint (seen
        with `scontrol requeue`). Without a result, submitit waits for the next attempt's (or reports the
        job cancelled)."""
        if self._sigterm is None:
            return
        (received, previous), self._sigterm = self._sigterm, None
        signal.signal(signal.SIGTERM, previous)
        if received.is_set():
            log.warning("SLURM terminated this task (requeue, preemption or cancellation): no result reported "
                        "(job status %s)", getattr(job_return, "status", None))
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signal.SIGTERM)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            report = write_sweep_report(sweep_dir)
            log.info("sweep report: %s", report["md"])
        except Exception as err:  # a report must never turn a finished sweep into a failure
            log.warning("no sweep report for %s: %s", sweep_dir, err)


def check_launcher(cfg: Any) -> None:
    """A submitit launcher starts one task per device and requeues jobs: check both against the config."""
    launcher = cfg.hydra.launcher
    target = str(launcher.get("_target_", ""))
    if "submitit" not in target:
        return
    devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError("trainer.devices", f"a submitit job starts one task per device, got devices={devices!r}.",
                          "set trainer.devices to the number of GPUs (or CPU processes) per node.")
    if launcher.tasks_per_node != devices:
        raise ConfigError(
            "hydra.launcher.tasks_per_node",
            f"{launcher.tasks_per_node} tasks per node but trainer.devices={devices}: Lightning takes its ranks from "
            "the launcher's tasks and needs one task per device.",
            "leave hydra.launcher.tasks_per_node at its default ${trainer.devices}.")
    if launcher.nodes != nodes:
        raise ConfigError("hydra.launcher.nodes", f"{launcher.nodes} nodes but trainer.num_nodes={nodes}.",
                          "leave hydra.launcher.nodes at its default ${trainer.num_nodes}.")
    gpus = launcher.get("gpus_per_node")
    if gpus and cfg.trainer.accelerator != "cpu" and gpus != devices:
        raise ConfigError("hydra.launcher.gpus_per_node", f"{gpus} GPUs per node but trainer.devices={devices}.",
                          "leave hydra.launcher.gpus_per_node at its default (trainer.devices GPUs when "
                          "trainer.accelerator is a GPU one, none otherwise).")
    requeues = target.endswith("SlurmLauncher") or int(launcher.get("max_num_timeout", 0)) > 0
    if requeues and cfg.get("resume") != "auto":
        raise ConfigError("resume", f"jobs of this launcher may be requeued, but resume={cfg.get('resume')}: a "
                          "requeued job would start again from step 0.", "set resume=auto.")


def watch_slurm_termination() -> tuple[threading.Event, Any] | None:
    """In a SLURM task: an event set when SIGTERM arrives, and the handler it replaced (submitit's, which logs
    and ignores it), which still runs; Lightning's handler, installed during fit, calls this one."""
    if "SLURM_JOB_ID" not in os.environ or threading.current_thread() is not threading.main_thread():
        return None
    received, previous = threading.Event(), signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous  # None: a handler not installed from Python

    def handler(signum: int, frame: Any) -> None:
        received.set()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # terminate, as without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)
    return received, previous


def export_local_task_env() -> None:
    """In a multi-task ``submitit_local`` job, give each task its torch.distributed rank (SLURM gives its own)."""
    if "SUBMITIT_LOCAL_JOB_ID" in os.environ and int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1 \
            and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
