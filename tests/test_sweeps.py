"""Sweeps: launcher and sweep configs, the sweep report, stage summaries, and a real submitit_local multirun
in which one job is preempted (USR2 after its first checkpoint), requeued by submitit and resumed."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distill.errors import ConfigError
from distill.sweep import main as sweep_main
from distill.sweep import swept_keys, write_sweep_report
from distill.sweep_callback import check_launcher
from distill.tracking import ID_FILE, SUMMARY_FILE, StageSummary, stable_run_id

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = ["data.max_documents=60", "data.seq_len=32", "data.tokenizer.vocab_size=384", "data.batch_size=8",
        "model.n_heads=2", "model.max_seq_len=32"]


# --- configs -----------------------------------------------------------------------------------------

def compose(app: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import distill.hydra_errors  # noqa: F401  (registers ${distill.gpus:...}, as every app does)
    from distill.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None, job_name=app):
        return hydra_compose(config_name=app, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    "accelerator, gpus",
    [
        (None, 4),  # the default, auto: Lightning takes the node's GPUs when it has any, so ask for them
        ("gpu", 4),
        ("cuda", 4),
        ("cpu", None),  # SLURM refuses a GPU request on a node without GPUs
        ("mps", None),
    ],
)
def test_slurm_launcher_follows_the_trainer(accelerator, gpus):
    overrides = [f"trainer.accelerator={accelerator}"] if accelerator else []
    cfg = compose("distill", ["hydra/launcher=submitit_slurm", "trainer.devices=4", "trainer.num_nodes=2",
                              "resume=auto", *overrides])
    launcher = cfg.hydra.launcher
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, gpus, 2)
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    assert launcher._target_.endswith("SlurmLauncher")
    check_launcher(cfg)  # consistent: no error


@pytest.mark.parametrize("accelerator, gpu_line", [("cpu", None), ("gpu", "#SBATCH --gpus-per-node=2")])
def test_slurm_sweep_asks_sbatch_for_gpus_only_on_a_gpu_accelerator(tmp_path, accelerator, gpu_line):
    """A real `-m` run of the app up to sbatch: a stand-in sbatch keeps the batch script and refuses it."""
    bin_dir, script = tmp_path / "bin", tmp_path / "sbatch.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script}\necho "sbatch: error: (test) not submitted" >&2\n'
                                    "exit 1\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit's SLURM executor wants srun on PATH
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "distill.pretrain", "-m", "hydra/launcher=submitit_slurm",
         f"trainer.accelerator={accelerator}", "trainer.devices=2", "resume=auto", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capture_output=True, text=True, timeout=300, env=env)
    assert "(test) not submitted" in proc.stderr, proc.stderr[-3000:]
    lines = script.read_text().splitlines()
    assert "#SBATCH --ntasks-per-node=2" in lines and "#SBATCH --nodes=1" in lines
    assert [line for line in lines if "gpu" in line or "gres" in line] == ([gpu_line] if gpu_line else [])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["hydra.launcher.tasks_per_node=1", "trainer.devices=2", "resume=auto"], "hydra.launcher.tasks_per_node"),
        (["hydra.launcher.nodes=2", "resume=auto"], "hydra.launcher.nodes"),
        (["trainer.devices=auto", "resume=auto"], "trainer.devices"),
        (["resume=never"], "resume"),  # SLURM requeues jobs: a requeued job would start again at step 0
    ],
)
def test_launcher_mismatch_names_the_key(overrides, key):
    cfg = compose("pretrain", ["hydra/launcher=submitit_slurm", *overrides])
    with pytest.raises(ConfigError) as err:
        check_launcher(cfg)
    assert err.value.key == key


def test_multirun_refuses_an_inconsistent_launcher_before_submitting(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "distill.pretrain", "-m", "hydra/launcher=submitit_slurm", "trainer.devices=2",
         "hydra.launcher.tasks_per_node=1", "resume=auto", f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "`hydra.launcher.tasks_per_node`" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / ".submitit").exists() and not (tmp_path / "0").exists()


@pytest.mark.parametrize(
    "app, sweep, swept",
    [
        ("distill", "kd_stop", {"kd.stop_fraction": "0.25,0.5,0.7,1.0"}),
        ("distill", "kd_temperature_weight", {"kd.temperature": "1.0,2.0,4.0", "kd.kd_weight": "0.5,1.0,2.0"}),
        ("distill", "student_depth", {"student.depth_ratio": "0.5,0.75,0.875,1.0"}),
        ("pretrain", "pyramid", {"model.num_experts": "[8,8],[4,8],[2,8],[8,4]"}),
        ("pipeline", "paper_claims", {"seed": "0,1,2"}),
    ],
)
def test_sweep_configs(app, sweep, swept):
    cfg = compose(app, [f"+sweep={sweep}"])
    assert dict(cfg.hydra.sweeper.params) == swept
    assert list(cfg.logger.tags) == ["sweep", sweep]
    assert cfg.hydra.sweep.dir.startswith(f"multirun/{sweep}_")
    assert cfg.hydra.callbacks.sweep._target_ == "distill.sweep_callback.SweepCallback"


# --- summaries and run ids ---------------------------------------------------------------------------

def test_stage_summary_keeps_history_before_the_resume_step(tmp_path):
    first = StageSummary(tmp_path, "distill", "abc")
    first.update({"train/loss": 5.0}, step=0)
    for step, loss in [(1, 4.0), (3, 3.0), (5, 3.5)]:
        assert first.update({"val/loss": loss, "val/ppl": 2.0 ** loss}, step=step)
    first.write("running")
    # requeued: training restarts from the checkpoint of step 4, so validations at steps >= 4 are redone
    second = StageSummary(tmp_path, "distill", "abc")
    second.update({"train/loss": 3.2}, step=4)
    second.update({"val/loss": 3.4}, step=5)
    out = json.loads(second.write("finished", {"params_total": 123, "model": object()}).read_text())
    assert out["val_history"] == [[1, 4.0], [3, 3.0], [5, 3.4]]
    assert out["best_val_loss"] == 3.0 and out["val_loss"] == 3.4 and out["first_step"] == 4
    assert out["status"] == "finished" and out["params_total"] == 123 and "model" not in out


def test_stable_run_id_written_once_by_rank_zero(tmp_path, monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    stable_run_id(tmp_path)
    assert not (tmp_path / ID_FILE).exists()
    monkeypatch.setenv("SLURM_PROCID", "0")
    run_id = stable_run_id(tmp_path)
    assert (tmp_path / ID_FILE).read_text().strip() == run_id
    assert stable_run_id(tmp_path) == run_id


# --- the sweep report on a hand-made multirun directory ----------------------------------------------

def fake_job(sweep: Path, num: int, overrides: list[str], summaries: dict[str, dict] | None) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    for sub, summary in (summaries or {}).items():
        (job / sub).mkdir(parents=True, exist_ok=True)
        (job / sub / SUMMARY_FILE).write_text(json.dumps(summary))
    (job / "wandb" / "offline-run-x" / "files").mkdir(parents=True)  # never read as a stage


def test_sweep_report_sorted_table_json_and_plot(tmp_path, capsys):
    losses = {0.25: 3.1, 0.5: 2.9, 0.7: 2.7}
    for num, (frac, loss) in enumerate(losses.items()):
        fake_job(tmp_path, num, ["teacher.path=/t", f"kd.stop_fraction={frac}"],
                 {".": {"stage": "distill", "status": "finished", "val_loss": loss, "val_ppl": 2.718 ** loss}})
    fake_job(tmp_path, 3, ["teacher.path=/t", "kd.stop_fraction=1.0"], None)  # failed before any validation
    sweep_main([str(tmp_path), "--x", "kd.stop_fraction"])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "sweep_report.json").read_text())
    expected = [str(f) for f, _ in sorted(losses.items(), key=lambda kv: kv[1])] + ["1.0"]
    assert [r["overrides"]["kd.stop_fraction"] for r in report["runs"]] == expected
    assert report["runs"][-1]["status"] == "missing"
    assert report["swept"] == ["kd.stop_fraction"] and report["common"] == {"teacher.path": "/t"}
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "distill" in line]
    assert [row.split(" | ")[3] for row in rows] == expected[:3]
    assert "| 3 | - | missing | 1.0 |" in printed
    assert (tmp_path / "sweep_report.png").stat().st_size > 1000
    assert "kd.stop_fraction" in (tmp_path / "sweep_report.md").read_text()


def test_sweep_report_pipeline_stages_and_bad_input(tmp_path):
    for num, depth in enumerate(["0.5", "0.75"]):
        fake_job(tmp_path, num, [f"student.depth_ratio={depth}"],
                 {stage: {"stage": stage, "status": "finished", "val_loss": 3.0 + num + i}
                  for i, stage in enumerate(["teacher", "student_staged_kd"])})
    report = write_sweep_report(tmp_path)
    assert [(r.job, r.stage) for r in report["runs"]] == [
        ("0", "teacher"), ("0", "student_staged_kd"), ("1", "teacher"), ("1", "student_staged_kd")]
    assert swept_keys(report["runs"]) == ["student.depth_ratio"]
    with pytest.raises(ConfigError) as err:
        write_sweep_report(tmp_path, x="kd.temperature")
    assert err.value.key == "--x"
    with pytest.raises(SystemExit) as exit_:
        sweep_main([str(tmp_path / "nope")])
    assert exit_.value.code == 2


# --- a real multirun through submitit_local, with one job preempted ----------------------------------

def wandb_records(path: Path) -> list:
    """Records of a `.wandb` file (LevelDB log framing: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def wandb_run(run_dir: Path, timeout: float = 60.0) -> dict:
    """id, group, job type, metric summaries and logged global steps of one offline run.

    wandb's service process writes the file after ``finish()`` returns: wait until it holds the run record
    and stops growing.
    """
    path = next(run_dir.glob("run-*.wandb"))
    deadline, size = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        if path.stat().st_size == size and any(r.WhichOneof("record_type") == "run" for r in wandb_records(path)):
            break
        size = path.stat().st_size
        time.sleep(0.5)
    out: dict = {"steps": [], "metrics": {}}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, group=r.run.run_group, job_type=r.run.job_type, tags=list(r.run.tags))
        elif kind == "metric":
            out["metrics"][r.metric.name] = r.metric.summary
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            if "trainer/global_step" in items:
                out["steps"].append(int(items["trainer/global_step"]))
    return out


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def submitit_task(root: int, job_id: str) -> int | None:
    """The pid of the task process of submitit job ``job_id`` under process ``root``."""
    for pid in descendants(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and f"SUBMITIT_LOCAL_JOB_ID={job_id}".encode() in env:
            return pid
    return None


MAX_STEPS = 8


@pytest.fixture(scope="module")
def preempted_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run a 2-job multirun; USR2 job 0 after its first checkpoint (as SLURM does before preempting it)."""
    root = tmp_path_factory.mktemp("multirun")
    # ${now:...%f}: if a requeued job re-resolved its sweep dir it would land in a new directory
    cmd = [sys.executable, "-m", "distill.pretrain", "-m", "hydra/launcher=submitit_local", "model.d_model=32,48",
           *TINY, "trainer=smoke", f"trainer.max_steps={MAX_STEPS}", "trainer.val_check_interval=4",
           "checkpoint.every_n_steps=2", "resume=auto", f"hydra.sweep.dir={root}/sweep_${{now:%H-%M-%S-%f}}"]
    log = open(root / "multirun.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, signalled = time.monotonic() + 420, None
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            job0 = next(root.glob("sweep_*/0"), None)
            if signalled is None and job0 is not None and (job0 / "checkpoints" / "last.ckpt").exists():
                job_id = str(yaml.safe_load((job0 / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])
                pid = submitit_task(proc.pid, job_id)
                if pid is not None:
                    os.kill(pid, signal.SIGUSR2)
                    signalled = pid
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    output = (root / "multirun.log").read_text()[-5000:]
    assert proc.returncode == 0, output
    assert signalled is not None, "job 0 finished before it could be preempted"
    return next(root.glob("sweep_*"))


@pytest.mark.slow
def test_submitit_local_multirun_two_points(preempted_sweep: Path):
    sweep = preempted_sweep
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1"], "one directory per job"
    losses = {}
    for num, d_model in [("0", "32"), ("1", "48")]:
        job = sweep / num
        assert f"model.d_model={d_model}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        summary = json.loads((job / SUMMARY_FILE).read_text())
        assert summary["status"] == "finished" and summary["step"] == MAX_STEPS
        losses[d_model] = summary["val_loss"]
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert (job / "checkpoints" / f"step{MAX_STEPS:06d}.ckpt").is_file()
        assert (job / "export" / "model.safetensors").is_file()
        runs = [wandb_run(d) for d in sorted((job / "wandb").glob("offline-run-*"))]
        assert runs and all(r["group"] == sweep.name and r["job_type"] == "pretrain" for r in runs)
        assert "min" in str(runs[0]["metrics"]["val/loss"]) and "last" in str(runs[0]["metrics"]["val/ppl"])
    report = json.loads((sweep / "sweep_report.json").read_text())  # written when the multirun ended
    assert report["swept"] == ["model.d_model"]
    by_loss = sorted(losses, key=losses.get)
    assert [r["overrides"]["model.d_model"] for r in report["runs"]] == by_loss
    assert [r["val_loss"] for r in report["runs"]] == [losses[d] for d in by_loss]
    assert (sweep / "sweep_report.png").stat().st_size > 1000
    assert "| model.d_model |" in (sweep / "sweep_report.md").read_text()
    sweep_main([str(sweep), "--wandb"])  # the table and plot as a run of the sweep's group
    report_run = wandb_run(next((sweep / "wandb").glob("offline-run-*")))
    assert (report_run["group"], report_run["job_type"]) == (sweep.name, "sweep_report")


@pytest.mark.slow
def test_preempted_job_resumes_from_checkpoint_in_the_same_wandb_run(preempted_sweep: Path):
    job = preempted_sweep / "0"
    logs = "".join(p.read_text() for p in (preempted_sweep / ".submitit").glob("*/*_0_log.*"))
    assert "this job is preempted" in logs and "Requeued job" in logs
    assert f"Restored all states from the checkpoint at {job / 'checkpoints' / 'last.ckpt'}" in logs
    run_id = (job / ID_FILE).read_text().strip()
    attempts = [wandb_run(d) for d in sorted((job / "wandb").glob("offline-run-*"))]
    assert len(attempts) == 2, "the requeued job ran a second time, in the same job directory"
    assert [a["id"] for a in attempts] == [run_id, run_id]
    first, second = attempts
    assert min(first["steps"]) == 0
    assert min(second["steps"]) >= 2, "the second attempt starts at the checkpoint's step, not at 0"
    assert max(second["steps"]) == MAX_STEPS
    summary = json.loads((job / SUMMARY_FILE).read_text())
    assert summary["wandb_id"] == run_id and summary["first_step"] >= 2
    assert len(list((preempted_sweep / "1" / "wandb").glob("offline-run-*"))) == 1, "job 1 ran once"


def test_a_stage_does_not_join_an_inherited_wandb_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wandb service token inherited from the launching process (a test runner or launcher that used wandb)
    is dropped before the stage's first run: sharing that service, a requeued job found its preempted
    attempt's stream still holding the run id ("run ID ... is in use", seen in CI)."""
    from omegaconf import OmegaConf

    from distill.tracking import loggers

    monkeypatch.setattr(loggers, "_OWN_SERVICE", False)
    monkeypatch.setenv("WANDB_SERVICE", "2-12345-tcp-localhost-40000")
    lcfg = OmegaConf.create({"kind": "wandb", "mode": "offline", "project": "p", "entity": None, "group": None,
                             "tags": []})
    loggers.make_stage_logger(lcfg, tmp_path, "pretrain", {})
    assert "WANDB_SERVICE" not in os.environ
