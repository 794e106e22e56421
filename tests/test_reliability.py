"""Exact resume after SIGKILL, atomic and verified checkpoints, the NaN/Inf guard, run_info.json.

The end-to-end tests start `python -m distill.distill` the way a user does, on a tiny corpus (a local
text file) and a tiny teacher whose student draws random numbers in training (dropout, router jitter,
random token dropping), so an RNG state that is not restored shows up as a different loss.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from distill.config import CheckpointConfig, OptimConfig, TrainerConfig
from distill.data import DataConfig, LMDataModule
from distill.data.resumable import ResumableLoader
from distill.errors import ConfigError, NonFiniteError
from distill.export import export_model
from distill.models import GPT, ModelConfig
from distill.models.fused import FUSED_LAYOUT
from distill.train.checkpoint_io import AtomicCheckpointIO
from distill.train.lm_module import LMModule
from distill.train.loss_log import read_loss_rows
from distill.train.resume import resolve_resume, verify_checkpoint
from distill.train.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, KD_STOP = 14, 6
TERMS = ("loss", "ce", "kd", "aux", "z")


@dataclass
class Setup:
    corpus: Path
    teacher: Path  # export directory (weights, config, tokenizer)


def data_overrides(corpus: Path) -> list[str]:
    return ["data=local_text", f"data.data_files={corpus}", "data.tokenizer.vocab_size=300", "data.seq_len=16",
            "data.batch_size=16"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """A ~60-paragraph corpus (about 10 train batches per epoch) and a random tiny teacher exported with the
    data's tokenizer. The teacher's training-time randomness (dropout, jitter, random drops) is inherited
    by the student."""
    root = tmp_path_factory.mktemp("reliability")
    rng = random.Random(0)
    words = "the a model teacher student expert router token layer loss step data block train value of".split()
    paragraphs = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + "." for _ in range(60)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n")
    data_cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "data" / "local_text.yaml"),
                               {"data_files": str(corpus), "tokenizer": {"vocab_size": 300}, "seq_len": 16,
                                "batch_size": 16})
    dm = LMDataModule(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), data_cfg)))
    dm.prepare_data()
    dm.setup("fit")
    model_cfg = ModelConfig.from_dict(dict(
        name="t", vocab_size=dm.vocab_size, d_model=32, n_layers=4, n_heads=2, max_seq_len=16, num_experts=[4, 4],
        dropout=0.1, moe=dict(top_k=1, residual=True, jitter_eps=0.1, drop_policy="random", capacity_factor=1.0))).validate()
    torch.manual_seed(0)
    teacher = export_model(GPT(model_cfg), model_cfg, root / "teacher", tokenizer=dm.tokenizer)
    return Setup(corpus, teacher)


def distill_cmd(run_dir: Path, s: Setup, *extra: str, teacher: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "distill.distill", *data_overrides(s.corpus), f"teacher.path={teacher or s.teacher}",
            "student.n_layers=2", "trainer=smoke", f"trainer.max_steps={MAX_STEPS}", "trainer.val_check_interval=4",
            "trainer.limit_val_batches=2", f"kd.stop_step={KD_STOP}", "kd.stop_fraction=null",
            "checkpoint.every_n_steps=1", "logger=none", f"hydra.run.dir={run_dir}", *extra]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(cmd: list[str], ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if ok and proc.returncode != 0:
        raise AssertionError(f"exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def kill_when(cmd: list[str], path: Path, timeout: float = 300) -> None:
    """Start ``cmd``; SIGKILL it as soon as ``path`` exists."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not path.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (status {proc.returncode}) before {path.name} was written:\n"
                                     f"{proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {path.name} after {timeout} s")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def step_of(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def losses_by_step(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = read_loss_rows(run_dir / "losses.jsonl")
    by_step = {row["step"]: row for row in rows}
    assert len(by_step) == len(rows), "one row per step (a resumed run drops the rows it runs again)"
    return by_step


# ----------------------------------------------------------------------------------------------------
# end to end: kill -9 during KD and after the stop step, resume, compare


def test_sigkill_during_and_after_kd_then_resume_reproduces_every_loss(setup: Setup, tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(distill_cmd(reference, setup))
    ckpts = killed / "checkpoints"

    # 1. killed during KD: a checkpoint exists for step 2 (KD runs until step 6)
    kill_when(distill_cmd(killed, setup), ckpts / "step000002.ckpt")
    first = resolve_resume("auto", killed)
    assert first is not None and 2 <= step_of(first) < KD_STOP, "killed mid-run, before the KD stop step"

    # 2. resumed, then killed again after the stop step
    kill_when(distill_cmd(killed, setup), ckpts / f"step{KD_STOP + 2:06d}.ckpt")
    second = resolve_resume("auto", killed)
    assert second is not None and KD_STOP < step_of(second) < MAX_STEPS

    # 3. last.ckpt is damaged (as by a non-atomic writer): auto-resume says so and takes the previous good one
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    final = run(distill_cmd(killed, setup))
    assert "last.ckpt is unusable" in final.stderr and "Trying the previous one" in final.stderr

    want, got = losses_by_step(reference), losses_by_step(killed)
    assert sorted(want) == sorted(got) == list(range(MAX_STEPS))
    for step in range(MAX_STEPS):
        for term in TERMS:
            assert abs(got[step][term] - want[step][term]) <= 1e-6, (step, term, got[step], want[step])
    assert all(want[s]["kd"] > 0 for s in range(KD_STOP)) and all(want[s]["kd"] == 0 for s in range(KD_STOP, MAX_STEPS))

    info = json.loads((killed / "run_info.json").read_text())
    assert [a["resumed_from"] is not None for a in info["attempts"]] == [False, True, True]
    assert Path(info["resumed_from"]).name.startswith("step"), "resumed from a step file, not the damaged last.ckpt"
    assert info["teacher"]["sha256"] and info["data"]["corpus"] and info["data"]["tokenizer"]
    assert info["git"]["commit"] and info["packages"]["torch"] == torch.__version__
    assert info["config"]["kd"]["stop_step"] == KD_STOP and info["config"]["resume"] == "auto"
    final_ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert final_ckpt["global_step"] == MAX_STEPS and "TrainingRNG" in final_ckpt["callbacks"]


def test_nan_teacher_stops_with_one_line_naming_the_term_and_step(setup: Setup, tmp_path: Path) -> None:
    bad = tmp_path / "nan_teacher"
    bad.mkdir()
    for f in setup.teacher.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(bad / "model.safetensors")
    name = next(k for k in weights if k.endswith("ln_f.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, bad / "model.safetensors")
    proc = run(distill_cmd(tmp_path / "run", setup, teacher=bad), ok=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "non-finite loss term kd at step 0" in errors[0] and "No checkpoint had been written yet" in errors[0]
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


# ----------------------------------------------------------------------------------------------------
# the mid-epoch data position, against a plain loader


class Indices(Dataset):
    def __len__(self) -> int:
        return 37

    def __getitem__(self, i: int) -> int:
        return i


def plain_loader(rank: int = 0, workers: int = 0) -> DataLoader:
    sampler = DistributedSampler(Indices(), num_replicas=2, rank=rank, shuffle=True, seed=3, drop_last=True)
    return DataLoader(Indices(), batch_size=4, sampler=sampler, num_workers=workers, persistent_workers=workers > 0)


@pytest.mark.parametrize("epoch, consumed, workers", [(0, 1, 0), (0, 3, 0), (2, 2, 0), (1, 0, 0), (1, 4, 0), (1, 5, 0),
                                                      (1, 2, 2)])
def test_resumable_loader_continues_with_the_next_batch(epoch: int, consumed: int, workers: int) -> None:
    """Batches seen before the checkpoint + batches after the restore == an uninterrupted plain loader.
    (37 samples, 2 replicas, batches of 4: 5 batches per epoch; after all 5, Lightning starts the next epoch.)"""

    def epoch_batches(loader: DataLoader | ResumableLoader, e: int) -> list[list[int]]:
        loader.sampler.set_epoch(e)
        return [b.tolist() for b in loader]

    reference = plain_loader(rank=1)
    want = epoch_batches(reference, epoch) + epoch_batches(reference, epoch + 1)
    first = ResumableLoader(plain_loader(rank=1, workers=workers))
    first.sampler.set_epoch(epoch)
    it = iter(first)
    seen = [next(it).tolist() for _ in range(consumed)]
    state = first.state_dict()
    assert state == {"epoch": epoch if consumed else None, "batches": consumed}

    resumed = ResumableLoader(plain_loader(rank=1, workers=workers))
    resumed.load_state_dict(state)
    finished = consumed == len(reference)
    got = seen + ([] if finished else epoch_batches(resumed, epoch)) + epoch_batches(resumed, epoch + 1)
    assert got == want and len(resumed) == len(reference) == 5


# ----------------------------------------------------------------------------------------------------
# checkpoint files


def small_checkpoint(step: int, value: float = 1.0) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "global_step": step, "loops": {}, "callbacks": {},
            "fused_layout": FUSED_LAYOUT}


def test_atomic_save_leaves_the_old_file_when_the_write_fails(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "ck" / "last.ckpt"
    io.save_checkpoint(small_checkpoint(1), path)
    before = path.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint(small_checkpoint(2), path)
    assert path.read_bytes() == before and verify_checkpoint(path) is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "no temporary file left behind"


def test_checkpoint_with_nan_weights_is_refused(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(small_checkpoint(1), path)
    with pytest.raises(NonFiniteError, match=r"weights `w` hold NaN/Inf at step 2"):
        io.save_checkpoint(small_checkpoint(2, float("inf")), path)
    assert step_of(path) == 1


def test_truncated_flipped_and_foreign_files_are_detected(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    AtomicCheckpointIO().save_checkpoint(small_checkpoint(3), good)
    data = good.read_bytes()
    assert verify_checkpoint(good) is None
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    assert "truncated" in verify_checkpoint(tmp_path / "cut.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert "empty" in verify_checkpoint(tmp_path / "empty.ckpt")
    with zipfile.ZipFile(good) as z:  # flip one byte inside the tensor data
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    flipped = bytearray(data)
    flipped[info.header_offset + 200] ^= 0xFF
    (tmp_path / "flip.ckpt").write_bytes(bytes(flipped))
    assert "CRC" in verify_checkpoint(tmp_path / "flip.ckpt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.ckpt")
    assert "not a training checkpoint" in verify_checkpoint(tmp_path / "other.ckpt")


def test_auto_resume_takes_the_newest_good_checkpoint(tmp_path: Path, capsys) -> None:
    ckpts = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    for step in (1, 2, 3):
        io.save_checkpoint(small_checkpoint(step), ckpts / f"step{step:06d}.ckpt")
    io.save_checkpoint(small_checkpoint(3), ckpts / "last.ckpt")
    (ckpts / ".last.ckpt.tmp-123").write_bytes(b"left by a killed save")
    assert resolve_resume("auto", tmp_path) == ckpts / "last.ckpt"
    assert not (ckpts / ".last.ckpt.tmp-123").exists()
    (ckpts / "last.ckpt").write_bytes(b"")
    (ckpts / "step000003.ckpt").write_bytes((ckpts / "step000002.ckpt").read_bytes()[:100])
    assert resolve_resume("auto", tmp_path) == ckpts / "step000002.ckpt"
    err = capsys.readouterr().err
    assert "last.ckpt is unusable: the file is empty" in err and "step000003.ckpt is unusable" in err
    assert resolve_resume("never", tmp_path) is None and resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path / "fresh") is None
    for load in (lambda p: resolve_resume(str(p), tmp_path), AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(ConfigError) as bad:
            load(ckpts / "step000003.ckpt")
        assert bad.value.key == "resume" and "truncated" in str(bad.value) and bad.value.fix


# ----------------------------------------------------------------------------------------------------
# the NaN/Inf guard inside a real Trainer (the apps' trainer: atomic IO, RNG and loss callbacks)


V, SEQ = 53, 16


class RandomBlocks(Dataset):
    def __init__(self) -> None:
        self.data = torch.randint(0, V, (64, SEQ + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i]}


class AtStep(L.Callback):
    def __init__(self, step: int, action) -> None:
        self.step, self.action = step, action

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.action(pl_module)


def guarded_fit(tmp_path: Path, action_step: int, action) -> str:
    trainer_cfg = TrainerConfig(max_steps=6, accelerator="cpu", devices=1, limit_val_batches=0, enable_progress_bar=False)
    model_cfg = ModelConfig.from_dict(dict(name="m", vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=SEQ,
                                       num_experts=[4])).validate()
    module = LMModule(model_cfg, OptimConfig(warmup_steps=1), 6)
    trainer, _ = build_trainer(trainer_cfg, CheckpointConfig(every_n_steps=1), {"name": "auto"}, tmp_path,
                               logger=False, extra_callbacks=[AtStep(action_step, action)])
    with pytest.raises(NonFiniteError) as err:
        trainer.fit(module, train_dataloaders=DataLoader(RandomBlocks(), batch_size=4))
    return str(err.value)


def assert_checkpoints_intact(ckpt_dir: Path, last_step: int) -> None:
    steps = sorted(int(p.stem[4:]) for p in ckpt_dir.glob("step*.ckpt"))
    assert steps == list(range(1, last_step + 1))
    for path in ckpt_dir.glob("*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
    assert step_of(ckpt_dir / "last.ckpt") == last_step


def test_nan_weights_stop_before_the_step_and_keep_good_checkpoints(tmp_path: Path) -> None:
    def poison(module) -> None:
        with torch.no_grad():
            module.model.wte.weight.fill_(float("nan"))

    message = guarded_fit(tmp_path, 3, poison)
    assert "non-finite loss term ce" in message and "at step 3" in message, message
    assert_checkpoints_intact(tmp_path / "checkpoints", last_step=3)
    assert [r["step"] for r in read_loss_rows(tmp_path / "losses.jsonl")] == [0, 1, 2]


def test_nan_gradient_with_finite_loss_is_caught(tmp_path: Path) -> None:
    def poison_grad(module) -> None:
        name, param = next((n, p) for n, p in module.named_parameters() if p.ndim == 2 and "blocks.0." in n)
        param.register_hook(lambda g: g * float("nan"))
        poison_grad.name = name

    message = guarded_fit(tmp_path, 2, poison_grad)
    assert "non-finite gradient at step 2" in message and poison_grad.name in message, message
    assert "loss terms were finite" in message
    assert_checkpoints_intact(tmp_path / "checkpoints", last_step=2)
