"""The distillation module: a frozen teacher, staged KD, release at the stop step, teacher identity."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from distill.config import OptimConfig
from distill.errors import ConfigError
from distill.export import export_model
from distill.kd import KDConfig, KDSchedule
from distill.models import GPT, ModelConfig
from distill.train.distill_module import DistillModule
from students.config import StudentConfig
from students.mos import derive_student
from teachers.native import ExportTeacher

V, L_SEQ = 61, 16


class RandomBlocks(Dataset):
    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, V, (n, L_SEQ + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i]}


def loader() -> DataLoader:
    return DataLoader(RandomBlocks(), batch_size=4, shuffle=False)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = ModelConfig.from_dict(dict(name="t", vocab_size=V, d_model=32, n_layers=4, n_heads=2, max_seq_len=L_SEQ,
                                 num_experts=[2, 4], moe=dict(top_k=1, residual=True))).validate()
    torch.manual_seed(0)
    return export_model(GPT(cfg), cfg, tmp_path_factory.mktemp("teacher") / "export")


class CountingLoader:
    """Loads the teacher, counts its forward calls, keeps a weak reference to see it freed."""

    def __init__(self, path: Path):
        self.path, self.loads, self.calls, self.ref = path, 0, 0, None

    def __call__(self) -> torch.nn.Module:
        self.loads += 1
        model = ExportTeacher(self.path).load()
        model.register_forward_hook(self._hook)
        self.ref = weakref.ref(model)
        return model

    def _hook(self, module, args, out) -> None:
        self.calls += 1
        assert not module.training, "the teacher must run in eval mode"
        assert torch.is_inference_mode_enabled(), "the teacher must run under inference mode"


def make_module(teacher_dir: Path, stop_step: int | None, max_steps: int, teacher_loader=None) -> DistillModule:
    source = ExportTeacher(teacher_dir)
    student_cfg = derive_student(source.architecture(), StudentConfig(n_layers=2))
    return DistillModule(student_cfg, OptimConfig(warmup_steps=1), KDSchedule(KDConfig(stop_step=stop_step), max_steps),
                         teacher_loader=teacher_loader or CountingLoader(teacher_dir),
                         teacher=source.identity().as_dict())


def trainer(tmp_path: Path, max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path), **kw)


def test_teacher_frozen_not_in_optimizer_or_checkpoint(teacher_dir, tmp_path):
    module = make_module(teacher_dir, stop_step=None, max_steps=2)
    t = trainer(tmp_path, 2)
    t.fit(module, train_dataloaders=loader())
    teacher = module.teacher
    assert teacher is not None and not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    assert opt_params == {id(p) for p in module.model.parameters()}
    assert all(not k.startswith(("teacher", "_slot")) for k in module.state_dict())
    t.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == {k for k in module.state_dict()}
    assert ckpt["distill"]["teacher"]["sha256"] == ExportTeacher(teacher_dir).identity().sha256
    # the student checkpoint loads back through Lightning's own API, schedule included
    loaded = DistillModule.load_from_checkpoint(tmp_path / "c.ckpt", map_location="cpu")
    assert loaded.schedule.cfg == module.schedule.cfg and loaded.schedule.max_steps == 2
    assert loaded.model_cfg == module.model_cfg and loaded.teacher_loader is None
    assert loaded.teacher_info == module.teacher_info
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name


def test_teacher_logits_usable_in_student_backward(teacher_dir):
    """Teacher logits come from inference mode but must feed the student's backward."""
    from distill.kd import kd_loss

    module = make_module(teacher_dir, stop_step=None, max_steps=1)
    inputs = next(iter(loader()))["input_ids"][:, :-1]
    t_logits = module.teacher_logits(inputs)
    assert not t_logits.requires_grad
    with torch.inference_mode():
        torch.testing.assert_close(t_logits, module.teacher(inputs).logits)
    kd = kd_loss(module.model(inputs).logits, t_logits)
    assert kd > 0
    kd.backward()
    assert module.model.wte.weight.grad is not None and module.model.wte.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teacher.parameters())


def test_teacher_not_called_after_stop_and_memory_released(teacher_dir, tmp_path):
    counting = CountingLoader(teacher_dir)
    module = make_module(teacher_dir, stop_step=3, max_steps=6, teacher_loader=counting)
    trainer(tmp_path, 6).fit(module, train_dataloaders=loader())
    assert counting.loads == 1
    assert counting.calls == 3  # steps 0, 1, 2 only
    assert module.teacher is None and module.teacher_released
    gc.collect()
    assert counting.ref() is None, "the teacher's memory must be released at the stop step"


def test_resume_after_stop_never_loads_teacher(teacher_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ck = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=4, save_top_k=-1)
    first = make_module(teacher_dir, stop_step=2, max_steps=4)
    trainer(tmp_path, 4, callbacks=[ck]).fit(first, train_dataloaders=loader())
    ckpt = sorted((tmp_path / "ck").glob("*.ckpt"))[-1]

    def forbidden() -> torch.nn.Module:
        raise AssertionError("a run resumed after the KD stop step must not load the teacher")

    resumed = make_module(teacher_dir, stop_step=2, max_steps=6, teacher_loader=forbidden)
    trainer(tmp_path, 6).fit(resumed, train_dataloaders=loader(), ckpt_path=str(ckpt))
    assert resumed.global_step == 6 and resumed.teacher_calls == 0


def test_resume_with_another_teacher_fails_clearly(teacher_dir, tmp_path):
    t = trainer(tmp_path, 1)
    t.fit(make_module(teacher_dir, stop_step=None, max_steps=1), train_dataloaders=loader())
    t.save_checkpoint(tmp_path / "c.ckpt")
    other = make_module(teacher_dir, stop_step=None, max_steps=2)
    other.teacher_info = {"path": "/elsewhere/export", "sha256": "0" * 64}
    with pytest.raises(ConfigError) as err:
        trainer(tmp_path, 2).fit(other, train_dataloaders=loader(), ckpt_path=str(tmp_path / "c.ckpt"))
    assert err.value.key == "teacher.path"


def test_kd_never_runs_has_one_representation(teacher_dir, tmp_path):
    """A schedule whose stop step is 0 never runs KD: no teacher is needed, and a given loader is never called."""
    def forbidden() -> torch.nn.Module:
        raise AssertionError("kd=none must not load the teacher")

    module = make_module(teacher_dir, stop_step=0, max_steps=2, teacher_loader=forbidden)
    assert not module.schedule.uses_teacher and module.teacher_loader is None
    trainer(tmp_path, 2).fit(module, train_dataloaders=loader())
    assert module.teacher_calls == 0 and module.teacher is None
    student = module.model_cfg
    DistillModule(student, OptimConfig(), KDSchedule(KDConfig(stop_step=0), 2))  # no loader needed
    needs_teacher = DistillModule(student, OptimConfig(), KDSchedule(KDConfig(), 2))  # e.g. loaded for evaluation
    with pytest.raises(RuntimeError, match="without a teacher_loader"):
        needs_teacher.ensure_teacher()
