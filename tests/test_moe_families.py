"""DeepSeek-V2, DeepSeek-V3 and GPT-OSS MoE layers as MoELayer options, against transformers' own modules."""

from __future__ import annotations

import pytest
import torch

from distill.errors import ConfigError
from distill.moe import MoEConfig, MoELayer
from distill.moe.families import hf_moe_state, moe_options_from_hf

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE, DeepseekV3TopkRouter  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP  # noqa: E402

D, F_HIDDEN, E = 16, 8, 8
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(cls_name: str, **kw):
    common = dict(hidden_size=D, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=32,
                  attn_implementation="eager", experts_implementation="eager")
    return getattr(transformers, cls_name)(**common | kw)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and buffer N(0, 0.5): non-trivial weights, biases and score-correction biases."""
    g = torch.Generator().manual_seed(seed)
    for t in list(module.parameters()) + list(module.buffers()):
        t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return module.float().eval()


def ours_from(hf_cfg, hf_module: torch.nn.Module, **override) -> MoELayer:
    family = hf_cfg.model_type
    cfg = MoEConfig(**moe_options_from_hf(hf_cfg) | override).validate(E)
    layer = MoELayer(D, 4 * D, E, cfg).eval()
    layer.load_state_dict(hf_moe_state(hf_module.state_dict(), family, cfg), strict=True)
    return layer


def v3_config(top_k: int = 3, n_group: int = 4, topk_group: int = 2, norm: bool = True):
    return tiny("DeepseekV3Config", n_routed_experts=E, moe_intermediate_size=F_HIDDEN, num_experts_per_tok=top_k,
                n_group=n_group, topk_group=topk_group, n_shared_experts=2, routed_scaling_factor=2.5,
                norm_topk_prob=norm, first_k_dense_replace=0)


def x_tokens(seed: int = 1, n: int = 40) -> torch.Tensor:
    return torch.randn(2, n // 2, D, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- DeepSeek-V3
@pytest.mark.parametrize("top_k,n_group,topk_group,norm", [(3, 4, 2, True), (1, 4, 1, True), (4, 2, 1, False),
                                                           (2, 1, 1, True)])
def test_deepseek_v3_moe_matches_transformers(top_k, n_group, topk_group, norm) -> None:
    hf_cfg = v3_config(top_k, n_group, topk_group, norm)
    hf = randomize(DeepseekV3MoE(hf_cfg))
    layer = ours_from(hf_cfg, hf)
    x = x_tokens()
    with torch.no_grad():
        y, stats = layer(x)
        torch.testing.assert_close(y, hf(x), **TOL)
    assert stats.drop_fraction.item() == 0.0
    if n_group > 1:  # the options matter: without the groups or without the correction bias the result differs
        for off in (dict(n_group=None, topk_group=None), dict(aux_free_bias=False)):
            cfg = MoEConfig(**moe_options_from_hf(hf_cfg) | off)
            plain = MoELayer(D, 4 * D, E, cfg).eval()
            plain.load_state_dict({k: v for k, v in layer.state_dict().items() if "balance_bias" not in k},
                                  strict=False)
            with torch.no_grad():
                assert not torch.allclose(plain(x)[0], y, atol=1e-3)


def test_deepseek_v3_router_choices_and_gates() -> None:
    hf_cfg = v3_config()
    hf = randomize(DeepseekV3TopkRouter(hf_cfg))
    ours = ours_from(hf_cfg, randomize(DeepseekV3MoE(hf_cfg))).router
    ours.weight.data.copy_(hf.weight)
    ours.balance_bias.copy_(hf.e_score_correction_bias)
    x = x_tokens(2).reshape(-1, D)
    with torch.no_grad():
        logits, weights, idx = hf(x)
        routing = ours(x, return_logits=True)
    order = idx.sort(dim=-1)
    mine = routing.expert_idx.sort(dim=-1)
    assert torch.equal(order.values, mine.values)
    torch.testing.assert_close(routing.gates.gather(1, mine.indices), weights.gather(1, order.indices), **TOL)
    torch.testing.assert_close(routing.logits, logits, **TOL)


# ------------------------------------------------------------------------------------------- DeepSeek-V2
@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2_moe_matches_transformers(method: str) -> None:
    hf_cfg = tiny("DeepseekV2Config", n_routed_experts=E, moe_intermediate_size=F_HIDDEN, num_experts_per_tok=3,
                  topk_method=method, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=1.5,
                  norm_topk_prob=True, first_k_dense_replace=0)
    hf = randomize(DeepseekV2Moe(hf_cfg))
    layer = ours_from(hf_cfg, hf)
    assert (layer.cfg.n_group is not None) == (method == "group_limited_greedy")
    assert not layer.cfg.renormalize  # transformers 5.24's V2 router ignores norm_topk_prob
    x = x_tokens(3)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], hf(x), **TOL)


# ------------------------------------------------------------------------------------------------ GPT-OSS
@pytest.mark.parametrize("top_k,grouped", [(3, True), (3, False), (1, True)])
def test_gpt_oss_mlp_matches_transformers(top_k: int, grouped: bool) -> None:
    hf_cfg = tiny("GptOssConfig", num_local_experts=E, intermediate_size=F_HIDDEN, num_experts_per_tok=top_k,
                  swiglu_limit=1.5, head_dim=8)
    hf = randomize(GptOssMLP(hf_cfg))
    layer = ours_from(hf_cfg, hf, use_grouped_mm=grouped)
    x = x_tokens(4)
    with torch.no_grad():
        y_hf, _ = hf(x)
        torch.testing.assert_close(layer(x)[0], y_hf, **TOL)
        h = x.reshape(-1, D) @ hf.experts.gate_up_proj[0] + hf.experts.gate_up_proj_bias[0]
    assert (h[:, 0::2] > 1.5).any() and (h[:, 1::2].abs() > 1.5).any()  # the clamps are exercised


def test_expert_bias_and_clamp_grouped_mm_equals_loop() -> None:
    cfg = dict(top_k=2, activation="swiglu", expert_bias=True, swiglu_limit=1.0, router_bias=True, dropless=True)
    torch.manual_seed(0)
    a = MoELayer(D, F_HIDDEN, E, MoEConfig(**cfg).validate(E))
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(std=0.5)
    b = MoELayer(D, F_HIDDEN, E, MoEConfig(**cfg, use_grouped_mm=False).validate(E))
    b.load_state_dict(a.state_dict())
    x = x_tokens(5)
    for layer in (a, b):
        y, stats = layer(x)
        (y.square().sum() + stats.aux_loss).backward()
    torch.testing.assert_close(a(x)[0], b(x)[0], **TOL)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.grad is not None and pa.grad.abs().sum() > 0, name
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- config checks
@pytest.mark.parametrize(
    "cfg,num_experts,key",
    [
        (dict(n_group=3, topk_group=1), 8, "model.moe.n_group"),
        (dict(n_group=0, topk_group=1), 8, "model.moe.n_group"),
        (dict(n_group=8, topk_group=1), 8, "model.moe.n_group"),  # one expert a group: no top-2 sum
        (dict(n_group=4, topk_group=5), 8, "model.moe.topk_group"),
        (dict(n_group=4), 8, "model.moe.topk_group"),
        (dict(topk_group=2), 8, "model.moe.topk_group"),
        (dict(top_k=4, n_group=4, topk_group=1), 8, "model.moe.topk_group"),
        (dict(n_group=2, topk_group=1, group_score="mean"), 8, "model.moe.group_score"),
        (dict(routed_scaling_factor=0.0), 8, "model.moe.routed_scaling_factor"),
        (dict(swiglu_limit=7.0), 8, "model.moe.swiglu_limit"),
        (dict(activation="swiglu", swiglu_limit=-1.0), 8, "model.moe.swiglu_limit"),
        (dict(swiglu_alpha=0.0), 8, "model.moe.swiglu_alpha"),
        (dict(renormalize=False, renormalize_top1=True), 8, "model.moe.renormalize_top1"),
    ],
)
def test_bad_family_config_raises_config_error(cfg: dict, num_experts: int, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        MoEConfig(**cfg).validate(num_experts)
    assert err.value.key == key and key in str(err.value)


def test_group_max_allows_one_expert_groups() -> None:
    MoEConfig(top_k=2, n_group=8, topk_group=2, group_score="max").validate(8)


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_rules_use_the_converters_kinds(family: str) -> None:
    """`moe_weight_rules` in the converter's own `fuse` gives what `hf_moe_state` loads."""
    from distill.interop.hf_weights import fuse
    from distill.moe.families import moe_weight_rules

    hf_cfg = v3_config() if family == "deepseek_v3" else tiny(
        "GptOssConfig", num_local_experts=E, intermediate_size=F_HIDDEN, num_experts_per_tok=2, head_dim=8)
    hf = randomize(DeepseekV3MoE(hf_cfg) if family == "deepseek_v3" else GptOssMLP(hf_cfg))
    cfg = MoEConfig(**moe_options_from_hf(hf_cfg))
    state = {"model.layers.1.mlp." + k: v for k, v in hf.state_dict().items()}
    ours = hf_moe_state(state, family, cfg, "blocks.1.ffn.", "model.layers.1.mlp.")
    rules = moe_weight_rules("blocks.1.ffn.", "model.layers.1.mlp.", family, cfg)
    assert {r[0] for r in rules} == set(ours) and {k for r in rules for k in r[1]} == set(state)
    for key, keys, how in rules:
        assert torch.equal(fuse(how, [state[k] for k in keys], None), ours[key]), key
