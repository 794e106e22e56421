"""The pipeline's study (conf/study/, distill/study.py) and the paper's claims in the sweep report (distill/claims.py)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from distill.claims import check_claims, job_reports, per_model
from distill.claims import main as claims_main
from distill.errors import ConfigError
from distill.resolve import resolve
from distill.sweep import write_sweep_report

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import distill.hydra_errors  # noqa: F401
    from distill.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None, job_name="pipeline"):
        return hydra_compose(config_name="pipeline", overrides=[*overrides, "out_dir=/tmp/unused"])


def test_default_study_is_the_make_run_trio():
    spec = resolve(compose([]), "pipeline")
    assert spec.baselines == {}
    assert list(spec.students) == ["student_staged_kd", "student_no_kd", "student_full_kd"]
    staged, none, full = spec.students.values()
    assert staged.schedule.stop_step == int(0.7 * spec.trainer.max_steps)
    assert none.schedule.stop_step == 0 and not none.schedule.uses_teacher
    assert full.schedule.stop_step is None
    assert staged.model == none.model == full.model == spec.student  # the same architecture: only KD differs


def test_paper_claims_study_resolves_every_point():
    cfg = compose(["+sweep=paper_claims"])
    spec = resolve(cfg, "pipeline")
    steps = spec.trainer.max_steps
    assert spec.pipeline.teacher_max_steps == steps  # students see as many tokens as the teacher
    assert spec.model.n_layers == 8 and spec.model.moe.residual and spec.model.moe.top_k == 1
    base = spec.baselines["standard_moe"]
    assert (base.num_experts, base.moe.top_k, base.moe.residual) == ([8, 8, 8, 8], 2, False)
    assert (base.n_layers, base.d_model) == (spec.model.n_layers, spec.model.d_model)
    depth = {"mos875": 7, "mos75": 6, "mos50": 4}
    for name, plan in spec.students.items():
        prefix, _, kd = name.partition("_")
        assert plan.model.n_layers == depth[prefix], name
        assert plan.model.num_experts[-1] == spec.model.num_experts[-1]  # the deepest, expert-rich layers kept
        stop = plan.schedule.stop_step
        if kd == "no_kd":
            assert stop == 0
        elif kd == "kd_full":
            assert stop is None
        else:
            assert stop == int(int(kd[2:4]) / 100 * steps), name
            assert plan.schedule.cfg.decay == ("linear" if kd.endswith("decay") else "none")
    assert len(spec.students) == 13


@pytest.mark.parametrize("override, key", [
    ("+study.students.bad={student: {depth_ratio: 2.0}}", "study.students.bad.student.depth_ratio"),
    ("+study.students.bad={kd: {stop_fraction: 1.5}}", "study.students.bad.kd.stop_fraction"),
    ("+study.students.bad={kd: {stop_fractoin: 0.5}}", "study.students.bad.kd"),
    ("+study.baselines.moe={moe: {top_k: 99}}", "study.baselines.moe.moe.top_k"),
    ("student.depth_ratio=2.0", "student.depth_ratio"),  # the run's own value keeps the run's key
    ("+study.students.BadName={kd_group: none}", "study.students.BadName"),
])
def test_bad_study_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        resolve(compose([override]), "pipeline")
    assert err.value.key == key


# --- the claims --------------------------------------------------------------------------------------

# val loss per seed of each model (made up, with known answers)
VAL = {
    "teacher": [4.00, 4.02, 3.98],
    "standard_moe": [4.01, 4.03, 3.99],  # PR-MoE better by 0.01 in every seed: beyond noise (zero spread)
    "mos875_kd70": [4.03, 4.05, 4.00],   # keeps exp(-0.03), exp(-0.03), exp(-0.02) > 0.97, < 0.99
    "mos875_kd_full": [4.02, 4.04, 3.99],  # full KD beats staged KD by 0.01 every seed
    "mos75_kd50": [4.10, 4.12, 4.09],
    "mos75_kd_full": [4.11, 4.10, 4.10],  # diffs -0.01, +0.02, -0.01: inconclusive
}


def write_jobs(root: Path, claims: str | None = "paper", values: dict[str, list[float]] = VAL) -> None:
    for seed in range(3):
        job = root / str(seed)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "study": {"claims": claims}}))
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}"]))
        models = {n: {"val_loss": v[seed], "test_loss": v[seed] + 0.05, "params_total": 1000,
                      "params_experts": 400 if n == "teacher" else 800} for n, v in values.items()}
        (job / "report.json").write_text(json.dumps({"models": models}))


def test_claims_against_a_hand_computed_reference(tmp_path):
    write_jobs(tmp_path)
    jobs = job_reports(tmp_path)
    assert sorted(jobs) == ["0", "1", "2"]
    rows = per_model(jobs)
    for name, vals in VAL.items():
        assert rows[name]["val_loss"]["mean"] == pytest.approx(statistics.fmean(vals))
        assert rows[name]["val_loss"]["std"] == pytest.approx(statistics.stdev(vals))
        kept = [math.exp(t - s) for t, s in zip(VAL["teacher"], vals)]
        assert rows[name]["kept"]["mean"] == pytest.approx(statistics.fmean(kept))
    claims = {(c["claim"], c["what"].split(":")[0].split(" ")[0]): c for c in check_claims(jobs)}
    c1 = claims[(1, "PR-MoE")]
    assert c1["diff"]["mean"] == pytest.approx(-0.01) and c1["verdict"] == "held"
    c2 = claims[(2, "mos875_kd70")]
    assert c2["verdict"] == "did not hold" and c2["exceeds_2se"]  # mean + 2 SE < 0.99
    c3 = claims[(3, "mos875_kd70")]
    assert c3["diff"]["mean"] == pytest.approx(0.01) and c3["verdict"] == "did not hold"
    c3b = claims[(3, "mos75_kd50")]
    d = [a - b for a, b in zip(VAL["mos75_kd50"], VAL["mos75_kd_full"])]
    assert c3b["diff"]["se"] == pytest.approx(statistics.stdev(d) / math.sqrt(3))
    assert c3b["verdict"] == "inconclusive" and not c3b["exceeds_2se"]


@pytest.mark.parametrize("baseline, verdict", [
    ([3.95, 3.97, 3.93], "did not hold"),  # PR-MoE worse by 0.05 in every seed: beyond noise
    ([3.90, 4.02, 3.98], "inconclusive"),  # diffs 0.10, 0, 0: within noise, but not within the 1% margin
    ([4.005, 4.025, 3.985], "held"),       # worse by 0.005 < the margin (0.01005 nats), no spread
])
def test_claim_one_is_non_inferiority_with_a_one_percent_margin(tmp_path, baseline, verdict):
    write_jobs(tmp_path, values={"teacher": VAL["teacher"], "standard_moe": baseline})
    (c1,) = [c for c in check_claims(job_reports(tmp_path)) if c["claim"] == 1]
    assert c1["verdict"] == verdict


def test_kd_rows_compare_each_student_with_its_no_kd_twin(tmp_path):
    write_jobs(tmp_path, values={"teacher": VAL["teacher"], "mos75_no_kd": [4.2, 4.3, 4.25],
                                 "mos75_kd70": [4.1, 4.2, 4.15]})
    (row,) = [c for c in check_claims(job_reports(tmp_path)) if c["claim"] == "kd"]
    assert row["diff"]["mean"] == pytest.approx(-0.1) and row["verdict"] == "KD helps"


def test_sweep_report_adds_the_claims_only_for_the_paper_study(tmp_path, capsys):
    write_jobs(tmp_path / "paper")
    write_sweep_report(tmp_path / "paper")
    md = (tmp_path / "paper" / "sweep_report.md").read_text()
    assert "The paper's claims (3 seeds" in md and "| mos875_kd70 |" in md
    assert json.loads((tmp_path / "paper" / "claims.json").read_text())["seeds"] == ["0", "1", "2"]
    write_jobs(tmp_path / "other", claims=None)
    write_sweep_report(tmp_path / "other")
    assert "claims" not in (tmp_path / "other" / "sweep_report.md").read_text()
    assert not (tmp_path / "other" / "claims.md").exists()
    claims_main([str(tmp_path / "paper")])
    assert "| 1 | PR-MoE val loss" in capsys.readouterr().out


def test_claims_of_an_unfinished_multirun_exit_2(tmp_path):
    (tmp_path / "0").mkdir()
    with pytest.raises(SystemExit) as err:
        claims_main([str(tmp_path)])
    assert err.value.code == 2
