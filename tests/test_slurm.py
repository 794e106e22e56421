"""Sweeps on a real one-node SLURM cluster (`bash .ci/slurm.sh start`; CI starts one around `make test`).

The apps run as a user runs them, ``python -m distill.<app> -m hydra/launcher=submitit_slurm ...``: sbatch,
srun, SLURM's task environment and SLURM's own requeue, which the submitit_local tests (tests/test_sweeps.py)
only imitate. The module skips when ``sbatch`` is absent or the cluster does not answer; with
``DISTILL_SLURM_REQUIRED=1`` (set by .ci/run) it fails instead, so that CI cannot pass without running it.
The node has the machine's CPUs (2 here): every job asks for one CPU per task, so the sweep's two jobs run
at once and the 2-task job takes the node.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from test_apps import run_app
from test_sweeps import TINY, wandb_run

from distill.parallel.checkpoint import inspect_sharded
from distill.tracking import ID_FILE, SUMMARY_FILE
from distill.train.loss_log import LOSSES, read_loss_rows

# one CPU per task (the launcher's default is 8, more than the node has: sbatch would refuse the job)
SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1", "trainer.accelerator=cpu", "resume=auto"]
MAX_STEPS = 8
# the distillation job of the sweep, and of the reference run it is compared with
DISTILL = [*TINY[:4], "trainer=smoke", f"trainer.max_steps={MAX_STEPS}", "trainer.val_check_interval=4",
           "checkpoint.every_n_steps=2", "kd.stop_fraction=0.5"]


def slurm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """Skip (fail under DISTILL_SLURM_REQUIRED=1) unless sbatch is here and the cluster has a node up.

    The apps started here and their SLURM jobs (sbatch exports the environment) use one intra-op thread: a
    task has one CPU, and the reference run must compute like the jobs it is compared with."""
    stop = pytest.fail if os.environ.get("DISTILL_SLURM_REQUIRED") == "1" else pytest.skip
    if shutil.which("sbatch") is None:
        stop("no sbatch on PATH: start a one-node cluster with `bash .ci/slurm.sh start`")
    try:
        proc = slurm("sinfo", "-h", "-o", "%t")
    except (OSError, subprocess.TimeoutExpired) as err:
        stop(f"the SLURM cluster does not answer (sinfo: {err})")
    states = proc.stdout.split()
    if proc.returncode != 0 or not {"idle", "mix", "alloc"} & set(states):
        stop(f"the SLURM cluster does not answer or has no node up (sinfo: {proc.stdout.strip()} "
             f"{proc.stderr.strip()[-300:]}); `bash .ci/slurm.sh status`")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        yield


def job_info(job_id: str, timeout: float = 60.0) -> dict[str, str]:
    """`scontrol show job` as a dict, once the job has ended (finished jobs stay visible for MinJobAge, 10
    minutes in .ci/slurm.sh). submitit hands the sweep a job's result as soon as the task has written it, a
    moment before the task exits and SLURM marks the job COMPLETED."""
    deadline = time.monotonic() + timeout
    while True:
        proc = slurm("scontrol", "show", "job", "-o", job_id)
        assert proc.returncode == 0, proc.stderr
        info = dict(field.split("=", 1) for field in proc.stdout.split() if "=" in field)
        if info["JobState"] not in ("PENDING", "RUNNING", "COMPLETING") or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def job_id(job_dir: Path) -> str:
    """The SLURM job id of a multirun job (``<array id>_<index>``), as Hydra recorded it."""
    return str(yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])


def multirun(app: str, root: Path, overrides: list[str], timeout: float, on_poll=None) -> Path:
    """``python -m distill.<app> -m`` through SLURM into ``root/sweep_<time>``; ``on_poll(sweep dir)`` runs
    every 50 ms while it runs. A run past ``timeout`` is killed and its SLURM jobs cancelled."""
    # ${now:...%f}: if a requeued job re-resolved its sweep dir it would land in a new directory
    cmd = [sys.executable, "-m", f"distill.{app}", "-m", *SLURM, *overrides,
           f"hydra.sweep.dir={root}/sweep_${{now:%H-%M-%S-%f}}"]
    log_path = root / "multirun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                sweep = next(root.glob("sweep_*"), None)
                if on_poll is not None and sweep is not None:
                    on_poll(sweep)
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.wait() != 0:  # leave no job of a failed sweep on the cluster (a requeued one would run on)
                jobs = [p.name for p in root.glob("sweep_*/.submitit/*_*")]
                if jobs:
                    slurm("scancel", *jobs)
    output = "\n".join(line for line in log_path.read_text().splitlines() if "sacct" not in line)
    assert proc.returncode == 0, f"the multirun failed or timed out ({proc.returncode}):\n{output[-5000:]}"
    return next(root.glob("sweep_*"))


@pytest.fixture(scope="module")
def teacher(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher's export, pretrained here (not on the cluster)."""
    out = tmp_path_factory.mktemp("teacher")
    run_app("pretrain", *TINY, "model.d_model=32", "trainer=smoke", "trainer.max_steps=2", "logger=csv",
            f"hydra.run.dir={out}")
    return out / "export"


@pytest.fixture(scope="module")
def requeued_sweep(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A sweep of two distillation jobs (kd.temperature=1.0,2.0); job 0 is requeued with `scontrol requeue`
    after its first checkpoint. Meanwhile the same config as job 0 runs here, uninterrupted: the reference."""
    root, ref = tmp_path_factory.mktemp("slurm_sweep"), tmp_path_factory.mktemp("reference")
    with open(ref / "app.log", "w") as log:
        reference = subprocess.Popen([sys.executable, "-m", "distill.distill", *DISTILL, "kd.temperature=1.0",
                                      f"teacher.path={teacher}", f"hydra.run.dir={ref}"],
                                     stdout=log, stderr=subprocess.STDOUT)
    requeued: list[str] = []

    def requeue_after_first_checkpoint(sweep: Path) -> None:
        job0 = sweep / "0"
        if not requeued and (job0 / "checkpoints" / "last.ckpt").exists():
            proc = slurm("scontrol", "requeue", job_id(job0))
            assert proc.returncode == 0, proc.stderr
            requeued.append(job_id(job0))

    try:
        sweep = multirun("distill", root, [*DISTILL, "kd.temperature=1.0,2.0", f"teacher.path={teacher}"],
                         timeout=300, on_poll=requeue_after_first_checkpoint)
        reference.wait(timeout=300)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert reference.returncode == 0, (ref / "app.log").read_text()[-3000:]
    assert requeued, "job 0 finished before it could be requeued"
    return {"sweep": sweep, "reference": ref}


@pytest.mark.slurm
def test_slurm_sweep_of_two_distillation_jobs_writes_the_report(requeued_sweep: dict):
    sweep = requeued_sweep["sweep"]
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1"], "one directory per job"
    losses = {}
    for num, temperature in [("0", "1.0"), ("1", "2.0")]:
        job = sweep / num
        info = job_info(job_id(job))
        assert info["JobState"] == "COMPLETED" and info["Partition"] == "debug", info
        assert info["NumCPUs"] == "1", "one CPU per task: the two jobs share the node"
        assert f"kd.temperature={temperature}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        summary = json.loads((job / SUMMARY_FILE).read_text())
        assert summary["status"] == "finished" and summary["step"] == MAX_STEPS
        losses[temperature] = summary["val_loss"]
        assert (job / "checkpoints" / f"step{MAX_STEPS:06d}.ckpt").is_file()
        assert (job / "export" / "model.safetensors").is_file()
        run = wandb_run(sorted((job / "wandb").glob("offline-run-*"))[-1])  # job 0: its second attempt
        assert (run["group"], run["job_type"]) == (sweep.name, "distill")
    report = json.loads((sweep / "sweep_report.json").read_text())  # written by SweepCallback at the end
    assert report["swept"] == ["kd.temperature"]
    by_loss = sorted(losses, key=losses.get)
    assert [r["overrides"]["kd.temperature"] for r in report["runs"]] == by_loss
    assert [r["val_loss"] for r in report["runs"]] == [losses[t] for t in by_loss]
    assert "| kd.temperature |" in (sweep / "sweep_report.md").read_text()


@pytest.mark.slurm
def test_requeued_job_resumes_in_the_same_wandb_run_with_the_losses_of_an_uninterrupted_one(requeued_sweep: dict):
    sweep, ref = requeued_sweep["sweep"], requeued_sweep["reference"]
    job = sweep / "0"
    assert job_info(job_id(job))["Restarts"] == "1", "SLURM ran job 0 twice"
    assert job_info(job_id(sweep / "1"))["Restarts"] == "0"
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*_0/*_0_log.*"))
    assert "SLURM terminated this task" in logs, "the first attempt reported no result (SweepCallback)"
    assert f"Restored all states from the checkpoint at {job / 'checkpoints' / 'last.ckpt'}" in logs
    run_id = (job / ID_FILE).read_text().strip()
    attempts = sorted((job / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2, "the requeued job ran a second time, in the same job directory"
    assert all(d.name.endswith(f"-{run_id}") for d in attempts), "both attempts log to the job's wandb run"
    # SLURM's SIGTERM reaches every process of the job, wandb's service too: the first attempt's offline file
    # may end before its first record, so only the second attempt's records are read
    second = wandb_run(attempts[1])
    assert second["id"] == run_id
    assert min(second["steps"]) >= 2, "the second attempt starts at the checkpoint's step, not at 0"
    assert max(second["steps"]) == MAX_STEPS
    summary = json.loads((job / SUMMARY_FILE).read_text())
    assert summary["wandb_id"] == run_id and summary["first_step"] >= 2
    # the numbers of the uninterrupted run, to the bit (one thread each): every step's loss terms (the steps
    # after the checkpoint from the second attempt), and the final validation loss
    got, want = read_loss_rows(job / LOSSES), read_loss_rows(ref / LOSSES)
    assert [r["step"] for r in want] == list(range(MAX_STEPS))
    assert got == want
    assert summary["val_loss"] == json.loads((ref / SUMMARY_FILE).read_text())["val_loss"]


@pytest.mark.slurm
def test_two_task_job_trains_expert_parallel_over_gloo(cluster: None, tmp_path: Path):
    """One SLURM job, 2 tasks (ranks from SLURM_PROCID via Lightning's SLURMEnvironment), experts split over
    the 2 ranks, all-to-all over gloo, a sharded checkpoint with one file per rank."""
    sweep = multirun("pretrain", tmp_path, [*TINY, "model.d_model=32", "trainer=smoke", "trainer.max_steps=4",
                                            "trainer.devices=2", "strategy=expert_parallel", "strategy.timeout_s=60",
                                            "data.batch_size=4", "logger=csv"], timeout=240)
    job = sweep / "0"
    info = job_info(job_id(job))
    assert (info["JobState"], info["NumTasks"], info["NumNodes"]) == ("COMPLETED", "2", "1"), info
    logs = {rank: (sweep / ".submitit" / job_id(job) / f"{job_id(job)}_{rank}_log.out").read_text() for rank in (0, 1)}
    assert "global_rank=0(2)" in logs[0] and "global_rank=1(2)" in logs[1], "two SLURM tasks, one rank each"
    assert "mesh: ep=2 over 2 ranks" in logs[0]
    assert inspect_sharded(job / "checkpoints" / "last.ckpt") == (None, 4)
    summary = json.loads((job / SUMMARY_FILE).read_text())
    assert summary["status"] == "finished" and summary["step"] == 4


# --- without a cluster: the SIGTERM that SLURM sends a task it requeues or cancels --------------------

SIGTERMED_TASK = """
import os, signal, sys
from distill.sweep_callback import SweepCallback

def bypass(*_):  # as submitit's handler: log, carry on
    print("previous handler ran", flush=True)


signal.signal(signal.SIGTERM, bypass)
callback = SweepCallback()
callback.on_job_start(config=None)
if sys.argv[1] == "term":
    os.kill(os.getpid(), signal.SIGTERM)
callback.on_job_end(config=None, job_return=None)
if signal.getsignal(signal.SIGTERM) is bypass:
    print("handler restored", flush=True)
"""


@pytest.mark.parametrize("event, returncode", [("term", 128 + signal.SIGTERM), ("none", 0)])
def test_a_slurm_task_sent_sigterm_reports_no_result(event: str, returncode: int):
    """SweepCallback.on_job_end ends a SLURM task that got SIGTERM before submitit pickles its result (which
    would fail the sweep while SLURM runs the job again); the handler it replaced still runs."""
    env = {**os.environ, "SLURM_JOB_ID": "1"}
    proc = subprocess.run([sys.executable, "-c", SIGTERMED_TASK, event], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == returncode, proc.stderr[-3000:]
    assert ("previous handler ran" in proc.stdout) == (event == "term")
    assert ("handler restored" in proc.stdout) == (event == "none")
