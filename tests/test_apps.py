"""The Hydra apps, started the way a user starts them (subprocesses), on tiny configs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.export import load_exported
from teachers.native import CheckpointTeacher

TINY_DATA = ["data.max_documents=60", "data.seq_len=32", "data.tokenizer.vocab_size=384", "data.batch_size=8"]
TINY_MODEL = ["model.d_model=32", "model.n_heads=2", "model.max_seq_len=32"]
# Runs an app module as __main__ (the real entry point) with counters around the checks that must run once
# per run: ModelConfig.validate (the names of the configs validated), MoEConfig.validate, KDSchedule().
COUNTING_DRIVER = """
import atexit, json, runpy, sys
from distill.kd import KDSchedule
from distill.models import ModelConfig
from distill.moe import MoEConfig

calls = {"model_validate": [], "moe_validate": 0, "kd_schedule": 0}
model_validate, moe_validate, schedule_init = ModelConfig.validate, MoEConfig.validate, KDSchedule.__init__

def counted_model_validate(self):
    calls["model_validate"].append(self.name)
    return model_validate(self)

def counted_moe_validate(self, *args, **kwargs):
    calls["moe_validate"] += 1
    return moe_validate(self, *args, **kwargs)

def counted_schedule_init(self, *args, **kwargs):
    calls["kd_schedule"] += 1
    schedule_init(self, *args, **kwargs)

ModelConfig.validate, MoEConfig.validate, KDSchedule.__init__ = (
    counted_model_validate, counted_moe_validate, counted_schedule_init)
out, app = sys.argv[1], sys.argv[2]
atexit.register(lambda: open(out, "w").write(json.dumps(calls)))
sys.argv = [app, *sys.argv[3:]]
runpy.run_module(app, run_name="__main__")
"""


def run_app(app: str, *overrides: str, ok: bool = True, timeout: int = 300,
            counts: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m distill.<app> <overrides>``; with ``counts``, through COUNTING_DRIVER writing its counts there."""
    start = [sys.executable, "-c", COUNTING_DRIVER, str(counts), f"distill.{app}"] if counts else \
        [sys.executable, "-m", f"distill.{app}"]
    proc = subprocess.run([*start, *overrides], capture_output=True, text=True, timeout=timeout)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{app} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    run_app("pretrain", *TINY_DATA, *TINY_MODEL, "trainer=smoke", "trainer.max_steps=4",
            "checkpoint.every_n_steps=2", f"hydra.run.dir={out}", counts=out / "counts.json")
    return out


@pytest.fixture(scope="module")
def distilled(pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distill")
    run_app("distill", *TINY_DATA, f"teacher.path={pretrained / 'export'}", "trainer=smoke",
            "trainer.max_steps=6", "kd.stop_fraction=0.5", "logger=csv", f"hydra.run.dir={out}",
            counts=out / "counts.json")
    return out


def test_pretrain_writes_checkpoints_export_and_offline_wandb(pretrained: Path):
    assert (pretrained / "checkpoints" / "last.ckpt").is_file()
    assert (pretrained / "export" / "model.safetensors").is_file()
    assert (pretrained / "export" / "tokenizer.json").is_file()
    runs = list((pretrained / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "an offline wandb run with its data file"


def test_checkpoint_export_reload_identical_logits(pretrained: Path):
    source = CheckpointTeacher(pretrained / "checkpoints" / "last.ckpt")
    from_ckpt, cfg = source.load(), source.architecture()
    from_export, cfg2 = load_exported(pretrained / "export")
    assert cfg == cfg2
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    from_export.eval()
    with torch.no_grad():
        torch.testing.assert_close(from_ckpt(idx).logits, from_export(idx).logits, rtol=0, atol=0)


def read_csv_metrics(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_distill_app_staged_kd_switches_off(distilled: Path):
    tmp_path = distilled
    rows = read_csv_metrics(tmp_path / "csv" / "metrics.csv")
    active = {int(r["step"]): float(r["kd/active"]) for r in rows if r.get("kd/active")}
    assert active == {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0, 5: 0.0}
    kd = {int(r["step"]): float(r["train/kd"]) for r in rows if r.get("train/kd")}
    assert all(kd[s] > 0 for s in (0, 1, 2)) and all(kd[s] == 0 for s in (3, 4, 5))
    teacher_ce = {int(r["step"]) for r in rows if r.get("teacher/ce") and r["teacher/ce"] != "nan"}
    assert teacher_ce == {0, 1, 2}
    assert any(r.get("val/kl_teacher") for r in rows) and any(r.get("val/top1_agree") for r in rows)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["distill"]["teacher"]["sha256"]
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])


def test_pipeline_app_writes_report(pretrained: Path, tmp_path: Path):
    proc = run_app("pipeline", *TINY_DATA, *TINY_MODEL, "trainer=smoke", "trainer.max_steps=4", "gen_tokens=4",
                   f"hydra.run.dir={tmp_path}")
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student_staged_kd", "student_no_kd", "student_full_kd"}
    for name, row in report["models"].items():
        for key in ("params_total", "params_active", "val_loss", "val_ppl", "train_tokens_per_s", "gen_tokens_per_s"):
            assert isinstance(row[key], (int, float)) and row[key] > 0, (name, key)
        assert row["params_active"] <= row["params_total"]
    assert report["models"]["student_no_kd"]["teacher_calls"] == 0
    assert report["models"]["student_full_kd"]["kd_stop_step"] is None
    assert report["models"]["student_staged_kd"]["params_total"] < report["models"]["teacher"]["params_total"]
    assert (tmp_path / "val_loss.png").stat().st_size > 1000
    assert "student_staged_kd" in (tmp_path / "report.md").read_text()
    assert "| student_no_kd |" in proc.stdout
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # the report run
    assert len(list((tmp_path / "teacher" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.parametrize(
    "app, overrides, key",
    [
        ("distill", ["teacher.path=/nonexistent/export"], "teacher.path"),
        ("pretrain", ["data.source=hf", "data.path=text", "data.data_files=/nonexistent/a.txt"], "data.data_files"),
        ("pretrain", ["model.n_heads=3"], "model.n_heads"),
        ("pretrain", ["model.moe.top_k=9"], "model.moe.top_k"),
    ],
)
def test_bad_input_exits_nonzero_naming_the_key(app, overrides, key, tmp_path):
    proc = run_app(app, *TINY_DATA, *overrides, "trainer=smoke", f"hydra.run.dir={tmp_path}", ok=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"`{key}`" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_key_rejected_by_schema(tmp_path):
    proc = run_app("pretrain", "model.d_modle=64", f"hydra.run.dir={tmp_path}", ok=False)
    assert proc.returncode == 2 and "`model.d_modle`" in proc.stderr and "model.d_model" in proc.stderr


def test_the_run_description_is_built_once_per_run(pretrained: Path, distilled: Path):
    """In a real app run each model config is validated once (its MoE config once with it) and the KD
    schedule is built once (counted by COUNTING_DRIVER around the pretrain and distill runs above)."""
    assert (pretrained / "export" / "model.safetensors").is_file() and (distilled / "export").is_dir()
    calls = json.loads((pretrained / "counts.json").read_text())
    assert calls == {"model_validate": ["tiny"], "moe_validate": 1, "kd_schedule": 0}, calls
    calls = json.loads((distilled / "counts.json").read_text())
    # the teacher's architecture (read from its export) and the 3-layer student derived from it
    assert calls == {"model_validate": ["tiny", "tiny-mos3"], "moe_validate": 2, "kd_schedule": 1}, calls


def test_distill_student_with_fewer_experts_chosen_by_importance(pretrained: Path, tmp_path: Path):
    """student.init=teacher with half the experts: a calibration pass picks them (students/experts.py)."""
    proc = run_app("distill", *TINY_DATA, f"teacher.path={pretrained / 'export'}", "trainer=smoke",
                   "trainer.max_steps=2", "student.init=teacher", "student.num_experts=[4]",
                   "student.expert_selection=importance", "student.calibration_batches=2", "logger=csv",
                   f"hydra.run.dir={tmp_path}")
    _, cfg = load_exported(tmp_path / "export")
    assert cfg.num_experts == [4]
    assert "teacher block 3's experts" in proc.stdout + proc.stderr and "(importance)" in proc.stdout + proc.stderr
