"""Multi-head latent attention against transformers' DeepseekV3Attention / DeepseekV2Attention, and its cache."""

from __future__ import annotations

import pytest
import torch

from distill.errors import ConfigError
from distill.models.mla import MLACache, MLAConfig, MultiHeadLatentAttention, rope_tables

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3  # noqa: E402

D, L, TOL = 32, 9, dict(atol=1e-5, rtol=1e-5)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 500.0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_config(family: str, **kw):
    cls = transformers.DeepseekV3Config if family == "v3" else transformers.DeepseekV2Config
    base = dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1, vocab_size=32,
                q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
                attention_bias=True, max_position_embeddings=64, rope_parameters=DEFAULT_ROPE,
                attn_implementation="eager")
    return cls(**base | kw)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():  # norms' weights around 1, the rest around 0
        p.copy_(torch.randn(p.shape, generator=g) * 0.3 + ("layernorm" in name))
    return module.float().eval()


def hf_forward(family: str, hf_cfg, attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
    if family == "v3":
        cos_sin = v3.DeepseekV3RotaryEmbedding(hf_cfg)(x, positions)
        return attn(x, position_embeddings=cos_sin, attention_mask=mask)[0]
    freqs_cis = v2.DeepseekV2RotaryEmbedding(hf_cfg)(x, positions)
    return attn(x, attention_mask=mask, position_embeddings=freqs_cis)[0]


def pair(family: str, **kw) -> tuple[MultiHeadLatentAttention, torch.nn.Module, object]:
    hf_cfg = hf_config(family, **kw)
    cls = v3.DeepseekV3Attention if family == "v3" else v2.DeepseekV2Attention
    hf = randomize(cls(hf_cfg, layer_idx=0))
    ours = MultiHeadLatentAttention(MLAConfig.from_hf(hf_cfg), layer_idx=0).eval()
    ours.load_hf_state_dict({"model.layers.0.self_attn." + k: v for k, v in hf.state_dict().items()},
                            prefix="model.layers.0.self_attn.")
    return ours, hf, hf_cfg


CASES = [
    ("v3", {}),
    ("v3", dict(rope_interleave=False)),
    ("v3", dict(rope_parameters=YARN, q_lora_rank=None, attention_bias=False)),
    ("v2", {}),
    ("v2", dict(q_lora_rank=None, rope_parameters=YARN)),
]


@pytest.mark.parametrize("family,kw", CASES)
def test_matches_transformers(family: str, kw: dict) -> None:
    ours, hf, hf_cfg = pair(family, **kw)
    assert ours.cfg.softmax_scale == pytest.approx(hf.scaling, rel=1e-12)
    x = torch.randn(2, L, D, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_tables(ours.cfg, torch.arange(L))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, cos, sin), hf_forward(family, hf_cfg, hf, x), **TOL)


def test_rope_tables_match_transformers_yarn() -> None:
    hf_cfg = hf_config("v3", rope_parameters=YARN)
    cfg = MLAConfig.from_hf(hf_cfg)
    assert cfg.rope_type == "yarn" and cfg.rope_factor == 4.0
    positions = torch.arange(40)
    hf_cos, hf_sin = v3.DeepseekV3RotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32), positions[None])
    cos, sin = rope_tables(cfg, positions)
    torch.testing.assert_close(cos, hf_cos[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sin, hf_sin[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family,kw", [CASES[0], CASES[4]])
def test_cache_step_by_step_equals_full_forward(family: str, kw: dict) -> None:
    ours, _, _ = pair(family, **kw)
    x = torch.randn(2, L, D, generator=torch.Generator().manual_seed(2))
    cos, sin = rope_tables(ours.cfg, torch.arange(L))
    cache = MLACache(n_layers=1, batch_size=2, max_len=L, cfg=ours.cfg)
    outs = []
    with torch.no_grad():
        full = ours(x, cos, sin)
        for a, b in [(0, 3), (3, 5), *[(i, i + 1) for i in range(5, L)]]:  # prefill, a chunk, single steps
            outs.append(ours(x[:, a:b], cos[a:b], sin[a:b], cache))
            cache.pos = b
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)
    assert cache.latent[0].shape == (2, 1, L, ours.cfg.kv_lora_rank)
    with pytest.raises(ValueError):
        ours(x[:, :1], cos[:1], sin[:1], cache)


def test_backward_and_init() -> None:
    cfg = MLAConfig(d_model=D, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6,
                    q_lora_rank=8, attention_bias=True).validate()
    attn = MultiHeadLatentAttention(cfg, 0)
    attn.init_weights(0.02, 0.01)
    x = torch.randn(1, 5, D, requires_grad=True)
    cos, sin = rope_tables(cfg, torch.arange(5))
    attn(x, cos, sin).square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in attn.parameters())


@pytest.mark.parametrize("kw,key", [
    (dict(qk_rope_head_dim=3), "model.mla.qk_rope_head_dim"),
    (dict(kv_lora_rank=0), "model.mla.kv_lora_rank"),
    (dict(q_lora_rank=-1), "model.mla.q_lora_rank"),
    (dict(rope_type="linear"), "model.mla.rope_type"),
    (dict(rope_type="yarn"), "model.mla.original_max_position_embeddings"),
    (dict(dropout=1.0), "model.mla.dropout"),
])
def test_bad_config_raises_config_error(kw: dict, key: str) -> None:
    base = dict(d_model=D, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
    with pytest.raises(ConfigError) as err:
        MLAConfig(**base | kw).validate()
    assert err.value.key == key
