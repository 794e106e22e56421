"""The LM pretraining module: every parameter learns, a tiny batch can be overfit, the LR schedule."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from distill.config import OptimConfig
from distill.models import ModelConfig
from distill.train.lm_module import LMModule
from distill.train.optim import warmup_cosine

V, SEQ = 53, 16


def tiny_cfg(**moe):
    return ModelConfig.from_dict(dict(name="t", vocab_size=V, d_model=32, n_layers=4, n_heads=2, max_seq_len=SEQ,
                                  num_experts=[2, 4], moe=dict(top_k=1, residual=True, **moe))).validate()


class SameBatch(Dataset):
    """``n`` copies of one fixed block: the loader serves the same batch every step."""

    def __init__(self, n: int):
        self.block = torch.randint(0, V, (SEQ + 1,), generator=torch.Generator().manual_seed(1))
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.block}


def fit(module: LMModule, steps: int, batch: int = 4) -> list[float]:
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, i) -> None:
            losses.append(float(outputs["loss"]))

    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              callbacks=[Record()]).fit(module, DataLoader(SameBatch(steps * batch), batch_size=batch))
    return losses


def test_one_step_changes_every_trainable_parameter():
    torch.manual_seed(0)
    module = LMModule(tiny_cfg(), OptimConfig(weight_decay=0.0, warmup_steps=1), max_steps=1)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit(module, 1, batch=8)
    unchanged = [n for n, p in module.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters not updated by one step: {unchanged}"
    assert any("router" in n for n in before), "the MoE layers' routers are among the parameters checked"


def test_loss_goes_down_on_a_tiny_batch():
    torch.manual_seed(0)
    module = LMModule(tiny_cfg(dropless=True), OptimConfig(lr=1e-2, warmup_steps=2), max_steps=40)
    losses = fit(module, 40)
    assert losses[0] > math.log(V) * 0.8  # starts near chance
    assert losses[-1] < 0.3 * losses[0], losses[::5]


@pytest.mark.parametrize("step, expected", [(0, 0.1), (9, 1.0), (10, 1.0), (55, 0.55), (100, 0.1)])
def test_warmup_cosine_schedule(step, expected):
    assert warmup_cosine(step, warmup_steps=10, max_steps=100, min_ratio=0.1) == pytest.approx(expected)
