"""Teacher sources (teachers/): one interface for every kind, damaged teachers refused before anything is
written, and the teacher a student is initialised from gone before `fit` starts, on every rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.errors import ConfigError
from distill.export import export_model
from distill.models import GPT, ModelConfig
from distill.models.fused import FUSED_LAYOUT
from distill.parallel.launch import child_env, run_ranks
from teachers.native import CheckpointTeacher, ExportTeacher

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TINY_DATA = ["data.max_documents=60", "data.seq_len=16", "data.tokenizer.kind=bytes", "data.batch_size=4"]


def tiny_cfg() -> ModelConfig:
    return ModelConfig.from_dict(dict(name="t", vocab_size=257, d_model=32, n_layers=4, n_heads=2, max_seq_len=16,
                                      num_experts=[2, 4], moe=dict(top_k=1, residual=True))).validate()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An intact export of a 4-layer teacher over the byte tokenizer's 257 ids."""
    from distill.data.config import EOS_TOKEN
    from distill.data.tokenizer import TextTokenizer, byte_tokenizer

    torch.manual_seed(0)
    cfg = tiny_cfg()
    return export_model(GPT(cfg), cfg, tmp_path_factory.mktemp("teacher") / "export",
                        tokenizer=TextTokenizer(byte_tokenizer(), EOS_TOKEN, "bytes"))


def damaged_copy(teacher: Path, root: Path, case: str) -> Path:
    """A copy of ``teacher`` damaged as ``case`` says (a .ckpt file for the checkpoint case)."""
    out = root / case
    out.mkdir()
    for f in teacher.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config, weights = out / "config.json", out / "model.safetensors"
    if case == "bad_json":
        config.write_text(config.read_text()[:-20])
    elif case == "no_model_entry":
        config.write_text(json.dumps({"meta": {}}))
    elif case == "missing_model_key":
        payload = json.loads(config.read_text())
        del payload["model"]["d_model"]
        config.write_text(json.dumps(payload))
    elif case == "garbage_weights":
        weights.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif case == "truncated_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif case == "shape_mismatch":
        payload = json.loads(config.read_text())
        payload["model"]["num_experts"] = [4, 4]  # the file holds [2, 4]
        config.write_text(json.dumps(payload))
    elif case == "checkpoint_without_weights":
        ckpt = out / "teacher.ckpt"
        torch.save({"hyper_parameters": {"model_cfg": json.loads(config.read_text())["model"]}, "global_step": 3}, ckpt)
        return ckpt
    return out


# (case, teacher config group, a piece of the message)
CASES = [
    ("bad_json", "native", "is not valid JSON"),
    ("no_model_entry", "native", "has no `model` entry"),
    ("missing_model_key", "native", "model.d_model"),
    ("garbage_weights", "native", "is not a readable safetensors file"),
    ("truncated_weights", "native", "is not a readable safetensors file"),
    ("shape_mismatch", "native", "weights and config disagree"),
    ("checkpoint_without_weights", "checkpoint", "holds no weights"),
]


@pytest.fixture(scope="module")
def damaged_runs(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """`python -m distill.distill` with each damaged teacher, all started at once: (status, stderr, run dir)."""
    root = tmp_path_factory.mktemp("damaged")
    procs = {}
    for case, group, _ in CASES:
        bad, run_dir = damaged_copy(teacher, root, case), root / f"run_{case}"
        cmd = [sys.executable, "-m", "distill.distill", *TINY_DATA, f"teacher={group}", f"teacher.path={bad}",
               "trainer=smoke", f"hydra.run.dir={run_dir}"]
        procs[case] = (subprocess.Popen(cmd, cwd=ROOT, env=child_env(threads=1), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True), run_dir)
    return {case: (p.wait(timeout=300), p.communicate()[1], run_dir) for case, (p, run_dir) in procs.items()}


@pytest.mark.parametrize("case, group, message", CASES, ids=[c[0] for c in CASES])
def test_damaged_teacher_exits_2_naming_teacher_path_and_writes_nothing(damaged_runs, case, group, message):
    status, stderr, run_dir = damaged_runs[case]
    assert status == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "config key `teacher.path`" in errors[0] and message in errors[0], errors[0]
    written = {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()
    assert not written & {"checkpoints", "export", "run_info.json", "losses.jsonl", "wandb", "summary.json"}, written


def test_sources_answer_the_same_for_an_export_and_its_checkpoint(teacher: Path, tmp_path: Path) -> None:
    model = ExportTeacher(teacher).load()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "t.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"model_cfg": json.loads((teacher / "config.json").read_text())["model"]},
                "fused_layout": FUSED_LAYOUT}, ckpt)
    export, checkpoint = ExportTeacher(teacher), CheckpointTeacher(ckpt)
    assert export.architecture() == checkpoint.architecture() == tiny_cfg()
    export.verify()
    checkpoint.verify()
    idx = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(export.load()(idx).logits, checkpoint.load()(idx).logits, rtol=0, atol=0)
    assert len(export.identity().sha256) == 64 and export.identity().path == str(teacher.resolve())
    assert export.load(torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_a_checkpoint_path_given_as_an_export_says_which_group_to_use(tmp_path: Path) -> None:
    (tmp_path / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError) as err:
        ExportTeacher(tmp_path / "last.ckpt")
    assert err.value.key == "teacher.path" and "teacher=checkpoint" in str(err.value)


def test_tied_weights_may_be_stored_under_either_name(teacher: Path, tmp_path: Path) -> None:
    copy = damaged_copy(teacher, tmp_path, "renamed")
    weights = load_file(copy / "model.safetensors")
    stored = "lm_head.weight" if "lm_head.weight" in weights else "wte.weight"
    other = "wte.weight" if stored == "lm_head.weight" else "lm_head.weight"
    weights[other] = weights.pop(stored)
    save_file(weights, copy / "model.safetensors")
    ExportTeacher(copy).verify()
    del weights[other]
    save_file(weights, copy / "model.safetensors")
    with pytest.raises(ConfigError, match="lacks the tensor"):
        ExportTeacher(copy).verify()


@pytest.mark.slow
def test_init_teacher_is_gone_before_fit_on_every_rank(teacher: Path, tmp_path: Path) -> None:
    results = run_ranks([sys.executable, str(TESTS / "init_teacher_worker.py"), str(teacher), str(tmp_path)],
                        world=2, timeout=240, cwd=ROOT)
    for status, out in results:
        assert status == 0, out[-4000:]
    for rank in range(2):
        facts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert facts["initialised_from"] == 1, facts  # the student was initialised from one loaded teacher
        assert facts["alive_at_fit_start"] == [False], facts
        assert facts["copied_equal"], facts


def test_an_export_in_the_old_fused_layout_is_converted(tmp_path: Path) -> None:
    """An export (or a checkpoint) written before the grouped layout of the fused projections (no
    `fused_layout`; [q | k | v] and [gate | up] concatenated) loads as the model it was, whole and region by
    region: written here by hand from a model's parts, the way the old code stored them."""
    from distill.models.fused import deinterleave, fused_tensors
    from distill.moe import MoEConfig
    from distill.parallel.load import full_index

    cfg = ModelConfig(name="old", vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=16,
                      mlp_activation="swiglu", bias=True, num_experts=[4, 4],
                      moe=MoEConfig(top_k=2, activation="swiglu", residual=True, num_shared_experts=1)).validate()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    out = export_model(model, cfg, tmp_path / "old")
    state = load_file(out / "model.safetensors")
    layouts = fused_tensors(cfg)
    assert {n.rsplit(".", 1)[0].split(".", 2)[2] for n in layouts} == {
        "attn.c_attn", "ffn.c_fc", "ffn.experts", "ffn.mlp.w_in", "ffn.shared_mlp.w_in"}
    for name, (dim, _, groups) in layouts.items():  # the old layout: the parts one after the other
        state[name] = torch.cat(deinterleave(state[name], groups, dim), dim).contiguous()
    save_file(state, out / "model.safetensors")
    payload = json.loads((out / "config.json").read_text())
    del payload["fused_layout"]
    (out / "config.json").write_text(json.dumps(payload))

    source = ExportTeacher(out)
    assert source.legacy_layout
    ids = torch.randint(64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(source.load()(ids).logits, model(ids).logits)
    lazy = source.sharded_tensors()
    for name, want in model.state_dict().items():
        assert torch.equal(lazy[name].read(full_index(want.shape)), want), name
        rows = slice(1, max(2, want.shape[0] - 1))  # a region that cuts groups
        assert torch.equal(lazy[name].read((rows, *full_index(want.shape[1:]))), want[rows]), name
    assert not ExportTeacher(export_model(model, cfg, tmp_path / "new")).legacy_layout

    # a Lightning checkpoint of that time: a teacher converts it; a resume refuses it, saying why
    from distill.train.resume import inspect_checkpoint

    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "global_step": 3, "loops": {},
                "hyper_parameters": {"model_cfg": payload["model"]}}, ckpt)
    old = CheckpointTeacher(ckpt)
    assert old.legacy_layout
    with torch.no_grad():
        assert torch.equal(old.load()(ids).logits, model(ids).logits)
    problem, step = inspect_checkpoint(ckpt)
    assert step is None and "older distill" in problem and "teacher=checkpoint" in problem
