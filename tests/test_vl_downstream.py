"""Downstream fine-tuning with the MoE frozen: VQA, dual-encoder retrieval, recall@k, the config checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill.errors import ConfigError
from distill.models.vl_config import VLMoEConfig
from distill.models.vlmoe import VLMoE
from distill.vl import downstream
from distill.vl.downstream import DownstreamConfig, finetune_retrieval, finetune_vqa, recall_at_k
from distill.vl.sets import RetrievalSet, VQASet

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "vl_tiny.yaml"
COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])
LEN = 8


@pytest.fixture(scope="module")
def model() -> VLMoE:
    cfg = VLMoEConfig.from_dict(OmegaConf.to_container(OmegaConf.load(CONF))).validate()
    torch.manual_seed(0)
    return VLMoE(cfg)


def coloured(colour: torch.Tensor, g: torch.Generator, size: int = 32) -> torch.Tensor:
    """Images [N, 3, size, size] of one colour each, with a little noise."""
    noise = 0.1 * torch.randn(len(colour), 3, size, size, generator=g)
    return (COLOURS[colour][:, :, None, None] + noise).clamp(-1, 1)


def text(n: int, g: torch.Generator, first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(10, 100, (n, LEN), generator=g)
    ids[:, 0] = 1  # [CLS]
    if first is not None:
        ids[:, 1] = first
    return ids, torch.ones(n, LEN, dtype=torch.bool)


def vqa_set(n: int, seed: int) -> VQASet:
    """The answer is the image's colour; the question is noise."""
    g = torch.Generator().manual_seed(seed)
    answers = torch.randint(0, 4, (n,), generator=g)
    ids, mask = text(n, g)
    return VQASet(coloured(answers, g), ids, mask, answers)


def retrieval_set(n: int, k: int, seed: int) -> RetrievalSet:
    """Caption i names image i's colour (token 2 + colour); distractors name another colour."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.randint(0, 4, (n,), generator=g)
    ids, mask = text(n, g, 2 + colour)
    d_ids, d_mask = text(n * k, g, 2 + (colour.repeat_interleave(k) + 1) % 4)
    return RetrievalSet(coloured(colour, g), ids, mask, d_ids.view(n, k, LEN), d_mask.view(n, k, LEN))


def naive_recall(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    hits = 0
    for q in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda j: -float(scores[q, j]))
        hits += order.index(int(positives[q])) < k
    return hits / scores.shape[0]


def test_recall_at_k_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    for q, n in ((7, 30), (50, 13), (1, 1)):
        scores, positives = torch.randn(q, n, generator=g), torch.randint(0, n, (q,), generator=g)
        got = recall_at_k(scores, positives, (1, 5, 10))
        assert got == {k: pytest.approx(naive_recall(scores, positives, k)) for k in (1, 5, 10)}
    # ties count against the positive: constant scores give no hits below the gallery size
    assert recall_at_k(torch.zeros(4, 6), torch.arange(4), (1, 5, 6)) == {1: 0.0, 5: 0.0, 6: 1.0}


def test_config_validation():
    assert DownstreamConfig().validate() == DownstreamConfig()
    for key, bad in (("vqa_steps", -1), ("batch_size", 0), ("eval_batch_size", 1.5), ("lr", 0.0),
                     ("weight_decay", -0.1), ("seed", "x")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            DownstreamConfig(**{key: bad}).validate()
        assert err.value.key == f"downstream.{key}"
    structured = OmegaConf.structured(DownstreamConfig)
    assert OmegaConf.to_object(OmegaConf.merge(structured, {"lr": 0.01})).lr == 0.01


def snapshot(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def capture_copies(monkeypatch) -> list[VLMoE]:
    copies: list[VLMoE] = []
    original = downstream._frozen_copy

    def spy(model):
        out = original(model)
        copies.append(out[0])
        return out

    monkeypatch.setattr(downstream, "_frozen_copy", spy)
    return copies


def moe_and_rest(m: VLMoE) -> tuple[set[str], set[str]]:
    moe = {f"{name}.{p}" for name, layer in m.moe_layers for p, _ in layer.named_parameters()}
    return moe, {n for n, _ in m.named_parameters()} - moe


def test_vqa_learns_colour_with_moe_frozen(model, monkeypatch):
    copies, before = capture_copies(monkeypatch), snapshot(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = DownstreamConfig(vqa_steps=40, batch_size=32, lr=2e-3, seed=0)
    out = finetune_vqa(model, vqa_set(256, 0), vqa_set(128, 1), num_answers=4, cfg=cfg, progress=False)
    assert out["frozen_ok"] is True
    assert out["vqa_acc"] > 0.6, out["vqa_acc"]  # chance: about 0.25
    assert len(out["vqa_curve"]) == 40 and out["vqa_curve"][-1][1] < out["vqa_curve"][0][1]
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is untouched
    tuned = dict(copies[0].named_parameters())
    moe, rest = moe_and_rest(copies[0])
    assert moe and all(torch.equal(tuned[n], initial[n]) for n in moe)
    assert any(not torch.equal(tuned[n], initial[n]) for n in rest)
    assert not downstream._frozen_ok(copies[0], {n: initial[n] + 1 for n in moe})  # computed, not assumed


def test_retrieval_dual_encoder_with_moe_frozen(model, monkeypatch):
    copies, before = capture_copies(monkeypatch), snapshot(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = DownstreamConfig(retrieval_steps=40, batch_size=16, eval_batch_size=7, lr=2e-3)
    out = finetune_retrieval(model, retrieval_set(64, 2, 0), retrieval_set(20, 2, 1), cfg, progress=False)
    assert out.keys() == {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "retrieval_curve", "gallery_size", "frozen_ok"}
    assert out["gallery_size"] == 20 + 20 * 2 and out["frozen_ok"] is True
    assert len(out["retrieval_curve"]) == 40
    for d in ("i2t", "t2i"):
        assert 0.0 <= out[f"{d}_r1"] <= out[f"{d}_r5"] <= 1.0
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    tuned = dict(copies[0].named_parameters())
    moe, rest = moe_and_rest(copies[0])
    assert all(torch.equal(tuned[n], initial[n]) for n in moe)
    assert any(not torch.equal(tuned[n], initial[n]) for n in rest)
