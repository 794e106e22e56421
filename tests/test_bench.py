"""The benchmark harness (distill/bench): figures' statistics, bench.json, --compare, section selection, the
GPU section's skip, the silencing of Lightning's banners, and the generation-speed measurement."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch

import distill.bench as bench
import distill.bench.__main__ as cli

ROOT = Path(__file__).resolve().parents[1]
REAL_QUIET = cli.quiet


@pytest.fixture(autouse=True)
def _fresh_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "results", {})
    monkeypatch.setattr(bench, "current_section", "misc")
    monkeypatch.setattr(bench, "REPS", None)
    monkeypatch.setattr(cli, "quiet", lambda: None)  # in-process: leave this session's warnings and env alone


def test_record_stores_median_spread_and_goal() -> None:
    bench.begin_section("s")
    med = bench.record("ratio", [1.0, 1.2, 0.9, 1.1, 1.0], goal="<= 1.15", unit="x")
    s = bench.results["s"]["ratio"]
    assert med == s["median"] == 1.0
    assert (s["min"], s["max"], s["n"]) == (0.9, 1.2, 5)
    assert s["spread"] == pytest.approx(0.3)  # (max - min) / median
    assert s["max_dev"] == pytest.approx(0.2)  # farthest sample from the median, relative
    assert s["samples"] == [1.0, 1.2, 0.9, 1.1, 1.0] and s["unit"] == "x" and s["met"] is True
    assert bench.fmt([1.0, 1.2, 0.9, 1.1, 1.0]) == "1.000 (±20.0%, n=5)"
    assert bench.fmt([2.5]) == "2.500 (±0.0%, n=1)"
    assert bench.fmt([10.0, 12.0], digits=1) == "11.0 (±9.1%, n=2)"
    with pytest.raises(ValueError):
        bench.record("empty", [])
    with pytest.raises(ValueError):
        bench.record("x", [1.0], better="faster")


@pytest.mark.parametrize("goal, median, unit, met", [
    ("<= 1.15", 1.15, "", True), ("<= 1.15", 1.16, "", False), (">= 1.6", 1.7, "", True),
    ("at least", 1.0, "", None), ("< 10%", 0.05, "", True), ("< 10%", 12.0, "%", False),
    ("< 10%", 9.0, "%", True), ("1.00 +- 0.03", 1.03, "", True), ("1.00 ± 0.03", 0.96, "", False),
    ("within 5% of 1.200 (theory)", 1.25, "", True), ("within 5% of 1.200", 1.27, "", False), (None, 1.0, "", None),
])
def test_goal_forms(goal: str | None, median: float, unit: str, met: bool | None) -> None:
    assert bench.goal_met(median, goal, unit) is met


def test_reps_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bench.reps(5) == 5
    monkeypatch.setattr(bench, "REPS", 2)
    assert bench.reps(5) == 2


def _fake_section(monkeypatch: pytest.MonkeyPatch, values: dict[str, list[float]]) -> None:
    def main() -> None:
        for name, samples in values.items():
            bench.record(name, samples, goal="<= 1.15" if name == "ratio" else None,
                         better="higher" if name == "tokens/s" else "lower")
        print("fake table")

    monkeypatch.setitem(sys.modules, "distill.bench.fake", types.SimpleNamespace(main=main))
    monkeypatch.setattr(cli, "SECTIONS", [*cli.SECTIONS, "fake"])


def test_bench_json_and_compare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    _fake_section(monkeypatch, {"ratio": [1.0, 1.1, 1.2], "tokens/s": [100.0, 110.0, 90.0]})
    old = tmp_path / "old.json"
    assert cli.main(["fake", "--out", str(old)]) == 0
    data = json.loads(old.read_text())
    assert data["schema"] == 1 and data["errors"] == {}
    assert set(data["sections"]) == {"fake"}
    ratio = data["sections"]["fake"]["ratio"]
    assert ratio["median"] == 1.1 and ratio["n"] == 3 and ratio["goal"] == "<= 1.15" and ratio["met"] is True
    for key in ("torch", "threads", "cpus", "loadavg_start", "loadavg_end", "date", "git_commit"):
        assert key in data["machine"]
    assert [p.name for p in tmp_path.iterdir()] == ["old.json"]  # no temporary file left behind
    out = capsys.readouterr().out
    assert "fake table" in out and "summary: goals" in out and "NOT met" not in out

    monkeypatch.setitem(sys.modules, "distill.bench.fake", None)
    _fake_section(monkeypatch, {"ratio": [1.3, 1.3, 1.3], "tokens/s": [220.0, 220.0, 220.0], "new": [1.0]})
    monkeypatch.setattr(bench, "results", {})
    assert cli.main(["fake", "--out", str(tmp_path / "new.json"), "--compare", str(old)]) == 0
    out = capsys.readouterr().out
    assert "NOT met" in out  # 1.3 > 1.15
    rows = {line.split(":")[1].split()[0]: line.split() for line in out.splitlines() if line.startswith("  fake: ")}
    assert rows["ratio"][-2:] == ["1.182", "worse"]  # 1.3 / 1.1, lower is better
    assert rows["tokens/s"][-2:] == ["2.200", "better"]  # 220 / 100, higher is better
    assert "new" not in rows  # only figures present in both runs


def test_compare_of_two_files() -> None:
    old = {"machine": {"date": "d"}, "sections": {"a": {"x": {"median": 2.0}, "gone": {"median": 1.0}}}}
    new = {"sections": {"a": {"x": {"median": 1.0, "better": "lower"}}, "b": {"y": {"median": 3.0}}}}
    text = cli.compare(old, new)
    assert "a: x" in text and "0.500" in text and "better" in text and "gone" not in text and "b: y" not in text
    assert "no figure" in cli.compare(old, {"sections": {}})
    noisy = {"sections": {"a": {"x": {"median": 2.1, "max_dev": 0.1}}}}
    assert cli.compare(old, noisy).splitlines()[-1].endswith("within spread")


def test_write_json_is_atomic_and_strict(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "bench.json"
    cli.write_json(path, {"sections": {"a": {"x": {"median": float("nan"), "spread": float("inf")}}}})
    assert json.loads(path.read_text()) == {"sections": {"a": {"x": {"median": None, "spread": None}}}}
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]


def test_unknown_section_and_bad_compare_exit_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code == 2 and "unknown section" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit) as e:
        cli.main(["optim", "--compare", str(bad)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["optim", "--compare", str(tmp_path / "missing.json")])
    assert e.value.code == 2


def test_failing_section_is_reported_and_others_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_section(monkeypatch, {"ratio": [1.0]})

    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setitem(sys.modules, "distill.bench.broken", types.SimpleNamespace(main=broken))
    monkeypatch.setattr(cli, "SECTIONS", [*cli.SECTIONS, "broken"])
    out = tmp_path / "b.json"
    assert cli.main(["broken", "fake", "--out", str(out)]) == 1
    data = json.loads(out.read_text())
    assert data["errors"] == {"broken": "RuntimeError: boom"} and "ratio" in data["sections"]["fake"]


def test_gpu_section_skips_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from distill.bench import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("BENCH_GPU_ON_CPU", raising=False)
    bench.begin_section("gpu")
    gpu.main()
    assert capsys.readouterr().out.strip().splitlines() == ["gpu: skipped (no CUDA device)"]
    assert bench.results["gpu"] == {}


@pytest.mark.slow  # builds the tiny teacher and student and runs a few bf16 steps on the CPU
def test_gpu_section_code_path_on_cpu(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from distill.bench import gpu

    for key, value in {"ON_CPU": "1", "BATCH": "1", "SEQ": "16", "STEPS": "2", "WARMUP": "0"}.items():
        monkeypatch.setenv(f"BENCH_GPU_{key}", value)
    bench.begin_section("gpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on a GPU: the experts run one after another (no CPU worker threads)
    try:
        gpu.main()
    finally:
        torch.set_num_threads(threads)
    figures = bench.results["gpu"]
    assert "fwd+bwd tokens/s (tiny, batch 1 x 16)" in figures
    kd = figures["distillation / student-only step, KD on (fwd+bwd)"]
    assert kd["n"] == 2 and kd["goal"].startswith("within 5% of ") and kd["median"] > 1
    assert "KD-on theory: 1 + teacher fwd / student fwd+bwd" in figures


def test_gpu_peak_and_flops(monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.bench import gpu
    from distill.models import GPT

    monkeypatch.delenv("BENCH_GPU_PEAK_TFLOPS", raising=False)
    assert gpu.peak_flops("NVIDIA H200") == gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and gpu.peak_flops("NVIDIA L40S") == 362e12
    assert gpu.peak_flops("Some GPU") is None
    cfg = gpu.load_cfg(gpu.CONF_DIR / "350m_prmoe32_64.yaml")
    assert cfg.vocab_size == 50304 and cfg.n_layers == 24
    tiny = GPT(gpu.load_cfg(gpu.CONF_DIR / "tiny.yaml", 512))
    active = tiny.num_active_params() - (0 if tiny.lm_head.weight is tiny.wte.weight else tiny.wte.weight.numel())
    want = 6 * active + 12 * tiny.cfg.n_layers * tiny.cfg.d_model * 64
    assert gpu.flops_per_token(tiny, 64) == want


SMOKE = textwrap.dedent("""
    import sys, types, warnings
    import distill.bench.__main__ as cli

    def main():
        import lightning as L
        import torch

        class M(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Linear(4, 1)
            def training_step(self, batch, i):
                return self.w(batch[0]).sum()
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4)), batch_size=2)
        # progress bar and model summary left at Lightning's defaults: the harness must turn them off
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False)
        trainer.fit(M(), data)
        warnings.warn("a warning that must not show")
        print("TABLE ROW")

    sys.modules["distill.bench.smoke"] = types.SimpleNamespace(main=main)
    cli.SECTIONS.append("smoke")
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_quiet_silences_lightning_loggers_and_trainer_defaults(monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    """In-process and without importing Lightning (the slow test below runs a real Trainer)."""
    for key in cli.QUIET_ENV:  # restored after the test
        monkeypatch.setenv(key, os.environ.get(key, ""))
    levels = {name: logging.getLogger(name).level for name in cli.QUIET_LOGGERS}
    try:
        with warnings.catch_warnings():
            REAL_QUIET()
            warnings.warn("a warning that must not show", stacklevel=1)
            logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
            logging.getLogger("lightning.pytorch.accelerators.cuda").info("LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES")
            logging.getLogger("lightning.fabric.utilities.rank_zero").warning("a fabric warning")
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    out, err = capfd.readouterr()
    assert not any(x in out + err for x in ("GPU available", "LOCAL_RANK", "must not", "fabric warning"))
    assert os.environ["PL_TRAINER_ENABLE_PROGRESS_BAR"] == os.environ["PL_TRAINER_ENABLE_MODEL_SUMMARY"] == "False"


@pytest.mark.slow  # a fresh interpreter importing torch and Lightning: ~10 s on an idle machine
def test_lightning_banners_and_warnings_silenced(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    run = subprocess.run([sys.executable, "-c", SMOKE, "smoke", "--out", str(tmp_path / "b.json")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text
    assert "TABLE ROW" in run.stdout
    for banner in ("GPU available", "TPU available", "LOCAL_RANK", "Total params", "must not show", "Warning"):
        assert banner not in text, text


def test_generation_speed_median_of_runs() -> None:
    from distill.evaluate import generation_speed, generation_tokens_per_s
    from distill.models import GPT, ModelConfig

    model = GPT(ModelConfig(name="g", vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)).train()
    g = generation_speed(model, 64, new_tokens=4, batch=2, prompt_len=4, repeats=3)
    assert len(g["samples"]) == 3 and min(g["samples"]) <= g["median"] <= max(g["samples"])
    assert g["spread"] == pytest.approx((max(g["samples"]) - min(g["samples"])) / g["median"])
    assert model.training  # restored
    assert generation_tokens_per_s(model, 64, 4, 2, repeats=1) > 0


def test_generation_speeds_interleave_the_models() -> None:
    """The pipeline's generation figures: a warm-up of each model, then one timed run of each in turn per round,
    so that a slow spell of the machine hits every model alike; eval mode during, each model's mode restored."""
    from distill.evaluate import generation_speeds
    from distill.models import GPT, ModelConfig

    cfg = ModelConfig(name="g", vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
    models = {"a": GPT(cfg).train(), "b": GPT(cfg).eval()}
    calls: list[tuple[str, bool, int]] = []
    for name, m in models.items():
        def generate(prompt, *args, _name=name, _m=m, _real=m.generate, **kwargs):
            calls.append((_name, _m.training, kwargs["max_new_tokens"]))
            return _real(prompt, *args, **kwargs)
        m.generate = generate
    g = generation_speeds(models, 64, new_tokens=4, batch=2, prompt_len=4, repeats=3, warmup=1)
    assert [c[0] for c in calls] == ["a", "b"] + ["a", "b"] * 3
    assert not any(training for _, training, _ in calls) and {n for *_, n in calls} == {4}
    for r in g.values():
        assert len(r["samples"]) == 3 and min(r["samples"]) <= r["median"] <= max(r["samples"])
    assert models["a"].training and not models["b"].training
