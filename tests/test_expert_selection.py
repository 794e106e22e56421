"""Students with fewer experts: REAP importance, the kept experts, shrinking and merging MoE layer states."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill.errors import ConfigError
from distill.models import GPT, ModelConfig
from distill.moe import MoELayer
from distill.moe.experts import activate
from students.config import StudentConfig
from students.experts import (
    ExpertStats,
    expert_importance,
    init_student_experts,
    keep_experts,
    merge_targets,
    shrink_moe_state,
)
from students.mos import default_teacher_layers, derive_student

TINY = Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny.yaml"


def tiny_cfg(**moe) -> ModelConfig:
    """conf/model/tiny.yaml (MoE blocks 1 and 3 with 4 and 8 experts), shrunk to test size."""
    cfg = ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(TINY)))
    return replace(cfg, vocab_size=97, d_model=32, n_heads=2, max_seq_len=16,
                   moe=replace(cfg.moe, **moe)).validate()


def teacher(seed: int = 0, **moe) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_cfg(**moe)).eval()


def batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (4, 16), generator=g) for _ in range(n)]


def expert_fn(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of `layer` on every row of x, through the layer's GroupedExperts forward."""
    counts = torch.zeros(layer.num_experts, dtype=torch.long)
    counts[e] = x.shape[0]
    return layer.experts(x, counts)


def test_planted_important_experts_are_kept():
    model = teacher()
    with torch.no_grad():
        model.blocks[1].ffn.experts.w_out[[1, 3]] *= 10.0
    stats = expert_importance(model, batches())
    assert sorted(stats) == [1, 3]
    s = stats[1]
    assert s.score.shape == (4,) and s.tokens.dtype == torch.long
    assert (s.tokens > 0).all() and s.tokens.sum() == 3 * 4 * 16  # top-1: one pair per token
    assert keep_experts(s, 2, "importance") == [1, 3]
    assert keep_experts(s, 2, "merge") == [1, 3]
    assert keep_experts(s, 2, "first") == [0, 1]
    assert stats[3].tokens.sum() == 3 * 4 * 16


def test_keep_experts_ties_and_unused():
    stats = ExpertStats(score=torch.tensor([0.5, 2.0, 0.5, 0.0, 2.0]), tokens=torch.tensor([3, 1, 2, 0, 4]))
    assert keep_experts(stats, 3, "importance") == [0, 1, 4]  # the tie at 0.5 goes to expert 0
    with pytest.raises(ValueError):
        keep_experts(stats, 6, "importance")
    with pytest.raises(ValueError):
        keep_experts(None, 2, "importance")


def test_scores_match_a_per_token_reference():
    model = teacher(top_k=2, renormalize=True)
    captured = {1: [], 3: []}
    hooks = [
        model.blocks[i].ffn.router.register_forward_hook(
            lambda _m, args, out, i=i: captured[i].append((args[0].clone(), out))
        )
        for i in captured
    ]
    stats = expert_importance(model, batches(2), max_batches=1)
    for h in hooks:
        h.remove()
    for i, calls in captured.items():
        assert len(calls) == 1  # max_batches=1
        layer, (x, routing) = model.blocks[i].ffn, calls[0]
        total = torch.zeros(layer.num_experts, dtype=torch.float64)
        count = torch.zeros(layer.num_experts, dtype=torch.long)
        w_in, w_out = layer.experts.w_in, layer.experts.w_out
        for t in range(x.shape[0]):
            for j in range(routing.expert_idx.shape[1]):
                e = int(routing.expert_idx[t, j])
                with torch.no_grad():
                    y = activate(x[t] @ w_in[e], layer.experts.activation) @ w_out[e]
                total[e] += float(routing.gates[t, j]) * float(y.norm())
                count[e] += 1
        ref = (total / count.clamp(min=1)).float()
        assert torch.equal(stats[i].tokens, count)
        torch.testing.assert_close(stats[i].score, ref, atol=1e-5, rtol=1e-5)


def test_shrunk_layer_keeps_experts_and_router_rows():
    cfg = tiny_cfg(aux_free_bias=True)
    torch.manual_seed(0)
    big = MoELayer(cfg.d_model, cfg.ffn_dim, 8, cfg.moe).eval()
    with torch.no_grad():
        big.router.balance_bias.copy_(1e-3 * torch.arange(8.0))
    keep = [1, 4, 6]
    state = shrink_moe_state(big.state_dict(), keep, "importance", None)
    small = MoELayer(cfg.d_model, cfg.ffn_dim, 3, cfg.moe).eval()
    small.load_state_dict(state)  # strict: the same keys and shapes
    x = torch.randn(20, cfg.d_model)
    with torch.no_grad():
        for pos, e in enumerate(keep):
            torch.testing.assert_close(expert_fn(small, pos, x), expert_fn(big, e, x))
        torch.testing.assert_close(F.linear(x, small.router.weight), F.linear(x, big.router.weight)[:, keep])
        assert torch.equal(small.router.balance_bias, big.router.balance_bias[keep])
        for name in ("mlp.w_in.weight", "mlp.w_out.weight", "coef.weight", "coef.bias"):
            assert torch.equal(state[name], big.state_dict()[name])
        # Tokens the teacher routes to a kept expert get the same layer output from the student.
        t_idx = big.router(x).expert_idx[:, 0]
        s_idx = small.router(x).expert_idx[:, 0]
        mask = torch.isin(t_idx, torch.tensor(keep))
        assert mask.any()
        assert torch.equal(torch.tensor(keep)[s_idx[mask]], t_idx[mask])


def test_merge_is_frequency_weighted_into_the_closest_router_row():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    layer = MoELayer(cfg.d_model, cfg.ffn_dim, 4, cfg.moe)
    with torch.no_grad():  # expert 3 points like expert 0, expert 1 like expert 2
        w = layer.router.weight
        w[3] = 2.0 * w[0] + 0.01 * torch.randn(cfg.d_model)
        w[1] = 0.5 * w[2] + 0.01 * torch.randn(cfg.d_model)
    keep, tokens = [0, 2], torch.tensor([5, 1, 3, 2])
    assert merge_targets(layer.router.weight, keep) == {1: 1, 3: 0}
    sd = layer.state_dict()
    state = shrink_moe_state(sd, keep, "merge", tokens)
    for key in ("experts.w_in", "experts.w_out"):
        w = sd[key]
        torch.testing.assert_close(state[key][0], (5 * w[0] + 2 * w[3]) / 7)
        torch.testing.assert_close(state[key][1], (3 * w[2] + 1 * w[1]) / 4)
    assert torch.equal(state["router.weight"], sd["router.weight"][keep])  # router rows not merged
    # A group whose experts received no token keeps its kept expert unchanged.
    state = shrink_moe_state(sd, keep, "merge", torch.tensor([5, 0, 0, 2]))
    assert torch.equal(state["experts.w_in"][1], sd["experts.w_in"][2])
    with pytest.raises(ValueError):
        shrink_moe_state(sd, keep, "merge", None)


@pytest.mark.parametrize("method", ["importance", "merge", "first"])
def test_student_with_fewer_experts_runs(method):
    model = teacher()
    scfg = derive_student(model.cfg, StudentConfig(n_layers=4, num_experts=[2, 8]))
    student = GPT(scfg).eval()
    mapping = default_teacher_layers(model.cfg, scfg)
    stats = expert_importance(model, batches(2)) if method != "first" else None
    kept = init_student_experts(student, model, mapping, method, stats)
    assert sorted(kept) == [1, 3] and kept[3] == list(range(8)) and len(kept[1]) == 2
    if method == "first":
        assert kept[1] == [0, 1]
    else:
        assert kept[1] == keep_experts(stats[1], 2, "importance")
    for k, v in model.blocks[3].state_dict().items():  # equal counts: copied as is
        assert torch.equal(student.blocks[3].state_dict()[k], v)
    s_attn, t_attn = student.blocks[1].attn.state_dict(), model.blocks[1].attn.state_dict()
    assert all(torch.equal(s_attn[k], t_attn[k]) for k in t_attn)
    with torch.no_grad():
        out = student(batches(1)[0])
    assert out.logits.shape == (4, 16, 97) and torch.isfinite(out.logits).all()


def test_more_student_experts_than_teacher_is_a_config_error():
    model = teacher()
    scfg = derive_student(model.cfg, StudentConfig(n_layers=4, num_experts=[4, 16]))
    student = GPT(scfg)
    with pytest.raises(ConfigError) as err:
        init_student_experts(student, model, default_teacher_layers(model.cfg, scfg), "first")
    assert err.value.key == "student.num_experts"
