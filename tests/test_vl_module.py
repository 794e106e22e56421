"""VLModule: masked data modeling of the three batch kinds, reproducible masks, staged KD, checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from distill.config import OptimConfig
from distill.kd import KDConfig, KDSchedule
from distill.models.vl_config import VLMoEConfig
from distill.models.vlmoe import VLMoE
from distill.vl.masking import MaskingConfig
from distill.vl.module import VLModule

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "vl_tiny.yaml"
SPECIAL = {"pad": 0, "cls": 1, "mask": 2}
B, LEN = 4, 12


def tiny_cfg() -> VLMoEConfig:
    return VLMoEConfig.from_dict(OmegaConf.to_container(OmegaConf.load(CONF))).validate()


def make_batch(kind: str, seed: int, cfg: VLMoEConfig) -> dict:
    """A learnable batch: text ids from a small range, visual tokens a function of the patch's colour."""
    g = torch.Generator().manual_seed(seed)
    batch: dict = {"kind": kind}
    if kind in ("image", "pair"):
        side = cfg.image_size // cfg.patch_size
        colours = torch.randint(0, 4, (B, 1, side, side), generator=g)
        images = (colours.float() / 1.5 - 1.0).repeat_interleave(cfg.patch_size, 2).repeat_interleave(cfg.patch_size, 3)
        batch["images"] = images.expand(B, 3, -1, -1).contiguous()
        batch["visual_tokens"] = (10 + colours.flatten(1)).long()
    if kind in ("text", "pair"):
        ids = torch.randint(3, 23, (B, LEN), generator=g)
        ids[:, 0] = SPECIAL["cls"]
        lengths = torch.randint(LEN // 2, LEN + 1, (B,), generator=g)
        mask = torch.arange(LEN)[None] < lengths[:, None]
        batch["text_ids"], batch["text_mask"] = ids.masked_fill(~mask, SPECIAL["pad"]), mask
    return batch


class Batches(Dataset):
    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def loader(n_each: int = 2, offset: int = 0) -> DataLoader:
    cfg = tiny_cfg()
    batches = [make_batch(kind, offset + 10 * i + j, cfg) for i in range(n_each)
               for j, kind in enumerate(("image", "text", "pair"))]  # fmt: skip
    return DataLoader(Batches(batches), batch_size=None, shuffle=False)


def make_module(max_steps: int, schedule: KDSchedule | None = None, teacher_loader=None, seed: int = 0,
                init_seed: int = 0) -> VLModule:
    torch.manual_seed(init_seed)
    return VLModule(tiny_cfg(), OptimConfig(lr=3e-3, warmup_steps=2), MaskingConfig(), max_steps, SPECIAL,
                    schedule=schedule, teacher_loader=teacher_loader, teacher={"path": "t", "sha256": "ab"},
                    seed=seed)  # fmt: skip


def trainer(tmp_path: Path, max_steps: int, **kw) -> L.Trainer:
    kw.setdefault("limit_val_batches", 0)
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                     log_every_n_steps=1, **kw)  # fmt: skip


class Record(L.Callback):
    """Each training batch's kind, its loss terms, and the logged metric names."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, dict]] = []
        self.keys: list[set[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append((batch["kind"], {k: float(v) for k, v in pl_module.step_terms.items()}))
        self.keys.append(set(trainer.logged_metrics))


def test_three_kinds_log_their_loss_and_learn(tmp_path):
    module, rec = make_module(30), Record()
    t = trainer(tmp_path, 30, callbacks=[rec], limit_val_batches=None, val_check_interval=6)
    t.fit(module, train_dataloaders=loader(), val_dataloaders=loader(1, offset=100))
    assert len(rec.rows) == 30
    for kind, name in (("image", "mim"), ("text", "mlm"), ("pair", "vl")):
        losses = [terms[name] for k, terms in rec.rows if k == kind]
        assert all(name not in terms for k, terms in rec.rows if k != kind)
        assert len(losses) == 10 and losses[-3:] and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, (kind, losses)
    for (_, terms), keys in zip(rec.rows, rec.keys):
        assert {"loss", "ce", "aux", "z"} <= terms.keys()
        assert {"train/loss", "train/ce", "train/aux", "train/z"} <= keys
    assert "moe/b1_t_load_cv" in rec.keys[1] and "moe/b3_t_drop_frac" in rec.keys[1]  # block 3: T-MoE on text
    assert "moe/b1_v_load_cv" in rec.keys[0]
    metrics = t.callback_metrics
    assert {"val/mlm", "val/mim", "val/vl", "val/loss", "val/ppl"} <= metrics.keys()
    vals = [float(metrics[f"val/{k}"]) for k in ("mlm", "mim", "vl")]
    assert float(metrics["val/loss"]) == pytest.approx(sum(vals) / 3, rel=1e-5)
    assert len(module.val_history) == 5 and module.val_history[-1][0] == 30
    assert module.val_history[-1][1] < module.val_history[0][1]
    figures = module.stage_figures()
    assert figures.keys() == {"val_mlm", "val_mim", "val_vl"} and figures["val_mlm"] == pytest.approx(vals[0])
    pair = make_batch("pair", 0, module.model_cfg)
    assert module.batch_tokens(pair) == B * 17 + int(pair["text_mask"].sum())


def test_masks_reproducible_and_validation_masks_ignore_the_step(tmp_path):
    a, b = make_module(4, seed=3), make_module(4, seed=3)
    batch = make_batch("pair", 0, a.model_cfg)
    m1, m2 = a.mask_batch(batch, a.train_generator(7)), b.mask_batch(batch, b.train_generator(7))
    m3 = a.mask_batch(batch, a.train_generator(8))
    for key in ("text_ids", "image_mask"):
        assert torch.equal(m1.inputs[key], m2.inputs[key])
    assert torch.equal(m1.text_targets, m2.text_targets) and torch.equal(m1.image_targets, m2.image_targets)
    assert not (torch.equal(m1.inputs["image_mask"], m3.inputs["image_mask"])
                and torch.equal(m1.text_targets, m3.text_targets))  # fmt: skip
    # never [CLS] or padding; targets are the original ids at the chosen positions only
    chosen = m1.text_targets != -100
    assert not chosen[:, 0].any() and not (chosen & ~batch["text_mask"]).any() and chosen.any(dim=1).all()
    assert torch.equal(m1.text_targets[chosen], batch["text_ids"][chosen])
    assert m1.inputs["image_mask"].float().mean() >= 0.4
    # validation: the same masks at every evaluation, whatever the step
    seen: list[list[torch.Tensor]] = []
    original = a.mask_batch

    def spy(batch, generator):
        masked = original(batch, generator)
        if not a.training:
            if not seen or len(seen[-1]) == 3:
                seen.append([])
            seen[-1].append(torch.cat([masked.inputs.get("image_mask", torch.zeros(0)).flatten().float(),
                                       masked.inputs.get("text_ids", torch.zeros(0)).flatten().float()]))
        return masked

    a.mask_batch = spy
    t = trainer(tmp_path, 4, limit_val_batches=None, val_check_interval=2, num_sanity_val_steps=0)
    t.fit(a, train_dataloaders=loader(), val_dataloaders=loader(1, offset=100))
    assert len(seen) == 2 and all(torch.equal(x, y) for x, y in zip(seen[0], seen[1]))


class CountingLoader:
    def __init__(self) -> None:
        self.loads, self.calls = 0, 0

    def __call__(self) -> torch.nn.Module:
        self.loads += 1
        torch.manual_seed(1)
        model = VLMoE(tiny_cfg())
        model.register_forward_hook(self._hook)
        return model

    def _hook(self, module, args, out) -> None:
        self.calls += 1
        assert not module.training and torch.is_inference_mode_enabled()


def test_staged_kd_loads_once_and_releases_at_stop(tmp_path):
    load = CountingLoader()
    module, rec = make_module(6, KDSchedule(KDConfig(stop_step=3), 6), load), Record()
    trainer(tmp_path, 6, callbacks=[rec]).fit(module, train_dataloaders=loader())
    kd = [terms["kd"] for _, terms in rec.rows]
    assert all(v > 0 for v in kd[:3]) and all(v == 0 for v in kd[3:])
    assert load.loads == 1 and load.calls == 3 and module.teacher_calls == 3
    assert module.teacher is None and module.teacher_released
    assert "kd/weight" in rec.keys[0] and "train/kd" in rec.keys[0]
    assert not any("teacher" in k or "_slot" in k for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.model.parameters())
    assert module.stage_figures()["kd_stop_step"] == 3 and module.stage_figures()["teacher_calls"] == 3
    with pytest.raises(RuntimeError, match="released"):
        module.ensure_teacher()
    assert load.loads == 1


def test_kd_stop_step_zero_never_loads_the_teacher(tmp_path):
    load = CountingLoader()
    module, rec = make_module(3, KDSchedule(KDConfig(stop_step=0), 3), load), Record()
    trainer(tmp_path, 3, callbacks=[rec]).fit(module, train_dataloaders=loader())
    assert load.loads == 0 and module.teacher_calls == 0
    assert all(terms["kd"] == 0 for _, terms in rec.rows)


def test_kd_teacher_absent_from_state_dict_while_held(tmp_path):
    load = CountingLoader()
    module = make_module(2, KDSchedule(KDConfig(), 2), load)
    trainer(tmp_path, 2).fit(module, train_dataloaders=loader())
    assert module.teacher is not None and load.loads == 1
    assert len(module.state_dict()) == len(module.model.state_dict())
    assert not any(p is q for p in module.parameters() for q in module.teacher.parameters())


def test_checkpoint_round_trip(tmp_path):
    module = make_module(3, KDSchedule(KDConfig(stop_step=0), 3), CountingLoader())
    t = trainer(tmp_path, 3)
    t.fit(module, train_dataloaders=loader())
    path = tmp_path / "vl.ckpt"
    t.save_checkpoint(path)
    loaded = VLModule.load_from_checkpoint(path, weights_only=True)
    assert isinstance(loaded.model_cfg, VLMoEConfig) and loaded.model_cfg == module.model_cfg
    assert isinstance(loaded.masking, MaskingConfig) and isinstance(loaded.optim, OptimConfig)
    assert loaded.schedule.stop_step == 0 and loaded.special == SPECIAL and loaded.teacher_info == module.teacher_info
    sd, lsd = module.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys() and all(torch.equal(sd[k], lsd[k]) for k in sd)
    assert torch.load(path, weights_only=True)["distill"]["kd_stop_step"] == 0
