"""The decoder: shapes, causality, KV-cache generation, parameter counts, config validation."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill.errors import ConfigError
from distill.losses import lm_loss
from distill.models import GPT, ModelConfig, configure_optimizer_groups
from distill.moe import MoEConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
PAPER_TOTALS = {  # DeepSpeed-MoE: total parameters, and the dense base model each is built on
    "350m_moe128": (13e9, 350e6),
    "350m_prmoe32_64": (4.0e9, 350e6),
    "1.3b_moe128": (52e9, 1.3e9),
    "1.3b_prmoe64_128": (31e9, 1.3e9),
}


def small_cfg(**overrides) -> ModelConfig:
    """A few-thousand-parameter residual PR-MoE; dropless so results do not depend on the batch."""
    moe = overrides.pop("moe", MoEConfig(top_k=1, residual=True, dropless=True))
    base = dict(
        name="test", vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_seq_len=32,
        moe_every=2, num_experts=[2, 4], moe=moe,
    )  # fmt: skip
    base.update(overrides)
    return ModelConfig(**base)


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(small_cfg(**overrides)).eval()


# ---------------------------------------------------------------------------------------------------
# forward


def test_forward_shapes_and_stats():
    model = make_model()
    idx = torch.randint(0, 64, (3, 10))
    out = model(idx)
    assert out.logits.shape == (3, 10, 64)
    assert out.aux_loss.shape == () and out.z_loss.shape == ()
    assert [s.tokens_per_expert.shape[0] for s in out.moe_stats] == [2, 4]
    assert torch.allclose(out.aux_loss, sum(s.aux_loss for s in out.moe_stats))
    assert torch.allclose(out.z_loss, sum(s.z_loss for s in out.moe_stats))
    # every routed token is counted once per layer (top-1, dropless)
    assert all(int(s.tokens_per_expert.sum()) == 30 for s in out.moe_stats)


def test_moe_every_places_moe_blocks():
    model = make_model(n_layers=6, moe_every=3, num_experts=[2, 3])
    assert [b.is_moe for b in model.blocks] == [False, False, True, False, False, True]
    assert [layer.num_experts for layer in model.moe_layers] == [2, 3]


def test_dense_model_has_zero_aux_and_backprops():
    model = make_model(moe_every=0, num_experts=[]).train()
    out = model(torch.randint(0, 64, (2, 8)))
    assert out.moe_stats == [] and float(out.aux_loss) == 0.0 and float(out.z_loss) == 0.0
    out.logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tied_embeddings():
    model = make_model()
    assert model.lm_head.weight is model.wte.weight


def test_meta_build_then_materialise():
    """Built on the meta device, moved to real memory and initialised, the model runs and trains."""
    with torch.device("meta"):
        model = GPT(small_cfg())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert model.lm_head.weight is model.wte.weight
    out = model(torch.randint(0, 64, (2, 6)))
    assert torch.isfinite(out.logits).all() and out.logits.std() > 0
    (out.logits.square().mean() + out.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def from_node(node) -> ModelConfig:
    """What the app layer does with a `model` node: merge onto the schema, build the dataclass, validate."""
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))
    assert isinstance(cfg, ModelConfig)
    return cfg.validate()


def test_accepts_a_hydra_node():
    node = OmegaConf.create(dataclasses.asdict(small_cfg()))
    assert GPT(from_node(node)).cfg == small_cfg()
    assert ModelConfig.from_dict(node) == small_cfg()  # any Mapping, an OmegaConf node included


def test_gpt_takes_its_config_as_given():
    """Building a model neither converts nor checks its config (the app layer validates once per run)."""
    cfg = small_cfg()
    assert GPT(cfg).cfg is cfg


def test_bf16_autocast_forward_and_generate():
    model = make_model()
    idx = torch.randint(0, 64, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx)
        generated = model.generate(idx, 4, greedy=True)
    assert out.logits.dtype == torch.bfloat16 and generated.shape == (2, 12)
    torch.testing.assert_close(out.logits.float(), model(idx).logits, rtol=0, atol=0.05)


def test_causal():
    model = make_model()
    idx = torch.randint(0, 64, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 64
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gpt2_init_scales_residual_projections():
    model = make_model(d_model=128, n_heads=4, moe_every=0, num_experts=[])
    std, out_std = 0.02, 0.02 / math.sqrt(2 * 4)
    blk = model.blocks[0]
    assert blk.attn.c_attn.weight.std().item() == pytest.approx(std, rel=0.05)
    assert blk.attn.c_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert blk.ffn.c_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(std, rel=0.05)
    assert not blk.attn.c_attn.bias.any()


# ---------------------------------------------------------------------------------------------------
# KV cache and generation


def test_cached_generation_matches_full_forward():
    model = make_model()
    prompt = torch.randint(0, 64, (2, 5))
    n_new = 9
    cached, cached_logits = model.generate(prompt, n_new, greedy=True, return_logits=True)
    plain, plain_logits = model.generate(prompt, n_new, greedy=True, use_cache=False, return_logits=True)
    assert torch.equal(cached, plain)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=0, atol=1e-5)
    # ... and with one full forward of the final sequence: position t predicts token t + 1
    full = model(cached).logits[:, prompt.size(1) - 1 : -1]
    torch.testing.assert_close(cached_logits, full, rtol=0, atol=1e-5)


def test_chunked_prefill_matches_full_forward():
    """Feeding a sequence into the cache in uneven chunks (the masked path) gives the full-forward logits."""
    model = make_model()
    idx = torch.randint(0, 64, (2, 13))
    full = model(idx).logits
    cache = model.new_cache(2)
    parts = [model(chunk, cache=cache).logits for chunk in idx.split([4, 1, 5, 3], dim=1)]
    assert cache.pos == 13
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_greedy_generate_equals_naive_argmax_decoding():
    model = make_model(seed=1, init_std=0.3)  # a large init gives sharp, position-dependent predictions
    prompt = torch.randint(0, 64, (3, 4))
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(model.generate(prompt, 10, greedy=True), seq)


def test_sampling_is_seeded_and_restores_train_mode():
    model = make_model().train()
    prompt = torch.randint(0, 64, (2, 3))
    a = model.generate(prompt, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 9)
    assert model.training
    # top_k=1 sampling is greedy decoding
    assert torch.equal(model.generate(prompt, 6, top_k=1), model.generate(prompt, 6, greedy=True))


def test_generate_rejects_too_long():
    model = make_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 3)


# ---------------------------------------------------------------------------------------------------
# parameter counts


def test_param_counts_by_hand():
    """Count the small residual PR-MoE by hand from the architecture and compare."""
    cfg = small_cfg(num_experts=[3, 5])
    model = GPT(cfg)
    V, d, f, k = cfg.vocab_size, cfg.d_model, 4 * cfg.d_model, cfg.moe.top_k
    norm = 2 * d  # LayerNorm gain + bias
    attn = (d * 3 * d + 3 * d) + (d * d + d)  # c_attn, c_proj with biases
    dense_mlp = (d * f + f) + (f * d + d)
    expert = d * f + f * d  # experts and the residual MLP have no biases
    router, mix = d, d * 2 + 2  # router row per expert; residual mixing Linear(d, 2)
    total = active = V * d + norm  # tied embedding/head once, final norm
    for E in (None, 3, None, 5):  # blocks 0..3, MoE every second
        common = 2 * norm + attn
        if E is None:
            total += common + dense_mlp
            active += common + dense_mlp
        else:
            total += common + E * router + E * expert + expert + mix
            active += common + E * router + k * expert + expert + mix
    assert model.num_params() == total == sum(p.numel() for p in model.parameters())
    assert model.num_active_params() == active < total


def test_paper_param_counts_on_meta_device():
    for name, (paper_total, base) in PAPER_TOTALS.items():
        cfg = from_node(OmegaConf.load(CONF_DIR / f"{name}.yaml"))
        with torch.device("meta"):
            model = GPT(cfg)
        total, active = model.num_params(), model.num_active_params()
        assert abs(total - paper_total) / paper_total < 0.05, (name, total)
        # a top-1 MoE token costs what a token of the dense base model costs; a residual one adds an
        # expert-sized MLP per MoE layer (12 of them, each 8 * d_model^2)
        extra = 12 * 8 * cfg.d_model**2 if cfg.moe.residual else 0
        assert abs(active - base - extra) / base < 0.05, (name, active)


# ---------------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("path", [p for p in sorted(CONF_DIR.glob("*.yaml")) if not p.stem.startswith("vl_")], ids=lambda p: p.stem)
def test_every_yaml_loads_onto_schema(path):
    node = OmegaConf.load(path)
    assert "defaults" not in node
    cfg = from_node(node)
    assert isinstance(cfg, ModelConfig) and isinstance(cfg.moe, MoEConfig)
    assert cfg.name == path.stem
    assert len(cfg.num_experts) == cfg.num_moe_layers
    plain = ModelConfig.from_dict(OmegaConf.to_container(node)).validate()  # plain Python, same result
    assert plain == cfg and isinstance(plain.moe, MoEConfig) and isinstance(plain.num_experts, list)


def test_hydra_group_override_by_name():
    """Config names with dots (`model=1.3b_prmoe64_128`) parse as Hydra overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR.parent), version_base="1.3"):
        cfg = compose(overrides=["+model=1.3b_prmoe64_128", "model.vocab_size=1000"])
    model_cfg = from_node(cfg.model)
    assert model_cfg.num_experts == [64] * 10 + [128] * 2 and model_cfg.vocab_size == 1000
    assert model_cfg.moe.residual


def test_tiny_yaml_is_a_residual_pyramid():
    cfg = from_node(OmegaConf.load(CONF_DIR / "tiny.yaml"))
    assert cfg.moe.residual and cfg.moe.top_k == 1 and cfg.num_experts == sorted(cfg.num_experts)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"n_heads": 3}, "model.n_heads"),  # 32 % 3
        ({"n_heads": 32}, "model.n_heads"),  # head size 1 is odd (rotary)
        ({"vocab_size": 0}, "model.vocab_size"),
        ({"d_ff": -1}, "model.d_ff"),
        ({"num_experts": [2]}, "model.num_experts"),
        ({"num_experts": [2, 0]}, "model.num_experts"),
        ({"moe_every": -1}, "model.moe_every"),
        ({"moe": MoEConfig(top_k=3)}, "model.moe.top_k"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"rope_theta": 0.0}, "model.rope_theta"),
        ({"init_std": 0.0}, "model.init_std"),
    ],
)
def test_bad_values_raise_config_error(overrides, key):
    with pytest.raises(ConfigError) as err:
        small_cfg(**overrides).validate()
    assert err.value.key == key


@pytest.mark.parametrize(
    "node, key",
    [
        ({"n_heads": "many"}, "model.n_heads"),
        ({"d_modle": 32}, "model.d_modle"),
        ({"moe": {"top_kk": 1}}, "model.moe.top_kk"),
        ({"name": "???"}, "model.name"),
    ],
)
def test_bad_yaml_raises_config_error(node, key):
    good = OmegaConf.to_container(OmegaConf.structured(small_cfg()))
    good.update(node)
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(good).validate()
    assert err.value.key == key


def test_unknown_keys_suggest_the_closest():
    good = dataclasses.asdict(small_cfg())
    with pytest.raises(ConfigError, match="is not a model config key") as err:
        ModelConfig.from_dict({**good, "d_modle": 32})
    assert err.value.key == "model.d_modle" and "model.d_model" in err.value.fix
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**good, "moe": {"top_kk": 1}})
    assert err.value.key == "model.moe.top_kk" and "model.moe.top_k" in err.value.fix


def test_from_dict_does_not_validate():
    cfg = ModelConfig.from_dict({**dataclasses.asdict(small_cfg()), "n_heads": 3})  # 32 % 3
    assert cfg.n_heads == 3 and isinstance(cfg.moe, MoEConfig)
    with pytest.raises(ConfigError):
        cfg.validate()


def test_missing_required_key():
    good = OmegaConf.to_container(OmegaConf.structured(small_cfg()))
    del good["vocab_size"]
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(good)
    assert err.value.key == "model.vocab_size"
    node = OmegaConf.structured(ModelConfig)  # every required value still "???"
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(node)
    assert err.value.key == "model.name"


# ---------------------------------------------------------------------------------------------------
# helpers


def test_lm_loss_averages_valid_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[1, 4] = -100
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 0] = False
    naive = [
        -F.log_softmax(logits[b, t], -1)[targets[b, t]]
        for b in range(2)
        for t in range(5)
        if mask[b, t] and targets[b, t] != -100
    ]
    torch.testing.assert_close(lm_loss(logits, targets, mask), torch.stack(naive).mean())
    assert float(lm_loss(logits, targets, torch.zeros_like(mask))) == 0.0


def test_optimizer_groups_split_by_rank():
    model = make_model()
    decay, no_decay = configure_optimizer_groups(model, 0.1)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each once, tied weight once
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    torch.optim.AdamW([decay, no_decay], lr=1e-3)  # accepted as is


def test_config_is_a_plain_dataclass():
    cfg = small_cfg()
    assert dataclasses.replace(cfg, n_layers=2, num_experts=[2]).num_moe_layers == 1
