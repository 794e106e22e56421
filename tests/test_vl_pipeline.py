"""`python -m distill.pipeline task=vl`, started the way a user starts it (a subprocess), on a tiny config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image as PILImage

from tests.test_apps import run_app

TINY_VL = ["task=vl", "data.num_scenes=150", "data.batch_size=8", "data.vocab_size=128",
           "data.image_tokenizer.codebook_size=16", "data.image_tokenizer.iterations=3",
           "data.image_tokenizer.sample_patches=2048", "model.d_model=32", "model.n_heads=2",
           "trainer=smoke", "trainer.max_steps=6", "trainer.val_check_interval=3", "teacher_max_steps=6",
           "downstream.vqa_steps=4", "downstream.retrieval_steps=4", "downstream.batch_size=8",
           "downstream.eval_batch_size=64"]


def test_vl_pipeline_app_writes_report(tmp_path: Path) -> None:
    proc = run_app("pipeline", *TINY_VL, f"hydra.run.dir={tmp_path}", timeout=600)
    report = json.loads((tmp_path / "report.json").read_text())
    models = report["models"]
    assert set(models) == {"teacher", "dense", "student_staged_kd", "student_no_kd"}
    for name, row in models.items():
        for key in ("params_total", "params_active", "val_mlm", "val_mim", "val_vl", "val_loss",
                    "train_tokens_per_s"):
            assert isinstance(row[key], (int, float)) and row[key] > 0, (name, key)
        for key in ("vqa_acc", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
            assert 0.0 <= row[key] <= 1.0, (name, key)
        assert row["i2t_r1"] <= row["i2t_r5"] and row["t2i_r1"] <= row["t2i_r5"]
        assert row["frozen_ok"] is True, name
        assert row["params_active"] <= row["params_total"]
    teacher, dense = models["teacher"], models["dense"]
    assert dense["params_total"] < teacher["params_total"]
    assert abs(dense["params_token"] - teacher["params_token"]) / teacher["params_token"] < 0.01  # routers only
    assert models["student_staged_kd"]["params_total"] < teacher["params_total"]
    assert models["student_staged_kd"]["teacher_calls"] > 0 and models["student_no_kd"]["teacher_calls"] == 0
    assert models["student_staged_kd"]["kd_stop_step"] == round(0.7 * 6)
    assert (tmp_path / "val_loss.png").stat().st_size > 1000 and (tmp_path / "downstream.png").stat().st_size > 1000
    md = (tmp_path / "report.md").read_text()
    assert "| student_staged_kd |" in md and "VQA acc" in md
    assert "| dense |" in proc.stdout
    for stage in models:
        assert (tmp_path / stage / "export" / "model.safetensors").is_file()
        assert len(list((tmp_path / stage / "wandb").glob("offline-run-*"))) == 1
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # the report run
    losses = [json.loads(line) for line in (tmp_path / "teacher" / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 6

    # the teacher export is reused by path: no teacher stage, the same data
    again = tmp_path / "again"
    run_app("pipeline", *TINY_VL, f"teacher.path={tmp_path / 'teacher' / 'export'}", "kd=none",
            f"hydra.run.dir={again}", timeout=600)
    assert not (again / "teacher").exists()
    assert set(json.loads((again / "report.json").read_text())["models"]) == set(models)


def _folder(root: Path, corrupt: bool = False) -> Path:
    """12 captioned images; with `corrupt`, one of them is not an image."""
    root.mkdir()
    rows = []
    for i in range(12):
        PILImage.new("RGB", (32, 32), (20 * i, 0, 0)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"red {i}"})
    if corrupt:
        (root / "5.png").write_bytes(b"not a png at all" * 10)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["mask.image_ratio=1.5"], "mask.image_ratio"),
        (["mask.text_ratio=0"], "mask.text_ratio"),
        (["data.image_tokenizer.codebook_size=0"], "data.image_tokenizer.codebook_size"),
        (["data.image_size=36"], "data.image_size"),
        (["model.image_size=64"], "model.image_size"),
        (["student.n_layers=4"], "student.n_layers"),
        (["teacher.path=/nonexistent/export"], "teacher.path"),
        (["trainer.devices=2"], "strategy"),
        (["downstream.batch_size=1"], "downstream.batch_size"),
    ],
)
def test_vl_config_errors_name_the_key(overrides: list[str], key: str, tmp_path: Path) -> None:
    """The checks `resolve_vl` runs once, before anything is built (the app turns them into exit 2)."""
    from hydra import compose, initialize_config_dir

    from distill.config import register_configs
    from distill.errors import ConfigError
    from distill.hydra_errors import CONF_DIR
    from distill.vl.resolve import resolve_vl

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("pipeline", overrides=[*TINY_VL, *overrides, f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        resolve_vl(cfg)
    assert err.value.key == key


def test_vl_tiny_config_resolves(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from distill.config import register_configs
    from distill.hydra_errors import CONF_DIR
    from distill.vl.resolve import resolve_vl

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        spec = resolve_vl(compose("pipeline", overrides=["task=vl", f"out_dir={tmp_path}"]))
    assert (spec.model.n_layers, spec.vl.student.n_layers, spec.vl.student.n_vl_layers) == (4, 2, 1)
    assert spec.vl.student.num_moe_blocks == 1 and spec.vl.dense.num_moe_blocks == 0
    assert spec.vl.students["student_no_kd"].stop_step == 0
    assert spec.vl.students["student_staged_kd"].stop_step == round(0.7 * spec.trainer.max_steps)
    assert spec.model.image_size == spec.data.image_size and spec.model.patch_size == spec.data.image_tokenizer.patch_size


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["mask.image_ratio=1.5"], "mask.image_ratio"),
        (["data=imagefolder", "data.path=FOLDER", "data.text_column=words"], "data.text_column"),
        (["data=imagefolder", "data.path=CORRUPT"], "data.path"),
    ],
)
def test_vl_bad_input_exits_2_naming_the_key(overrides: list[str], key: str, tmp_path: Path) -> None:
    folder, corrupt = _folder(tmp_path / "pics"), _folder(tmp_path / "corrupt", corrupt=True)
    overrides = [o.replace("FOLDER", str(folder)).replace("CORRUPT", str(corrupt)) for o in overrides]
    out = tmp_path / "run"
    proc = run_app("pipeline", *TINY_VL, *overrides, f"hydra.run.dir={out}", ok=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"`{key}`" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "teacher").exists() and not (out / "run_info.json").exists()
