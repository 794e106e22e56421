"""VL-MoE: modality routing, the VL-FFN, image masking, parameter counts, freezing, config checks, a reference."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill.errors import ConfigError
from distill.models.vl_config import VLMoEConfig
from distill.models.vlmoe import VLMoE, freeze_moe
from distill.moe import MoEConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
PAPER = {"base": (2.0e9, 180e6)}  # VL-MoE Base/32E: total parameters, active per token


def load_cfg(name: str) -> VLMoEConfig:
    return VLMoEConfig.from_dict(OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"vl_{name}.yaml"))).validate()


def tiny(**overrides) -> VLMoEConfig:
    """The tiny config, dropless (counts do not depend on capacity) with top-2 unless overridden."""
    cfg = load_cfg("tiny")
    moe = overrides.pop("moe", MoEConfig(top_k=2, dropless=True))
    return dataclasses.replace(cfg, moe=moe, **overrides).validate()


def make(seed: int = 0, **overrides) -> VLMoE:
    torch.manual_seed(seed)
    return VLMoE(tiny(**overrides)).eval()


def batch(cfg: VLMoEConfig, B: int = 3, L: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    return images, torch.randint(0, cfg.text_vocab_size, (B, L), generator=g)


def pool_totals(out, pool: str) -> dict[int, int]:
    """Routed (token, choice) pairs per block for one pool."""
    return {s.layer: int(s.stats.tokens_per_expert.sum()) for s in out.moe_stats if s.pool == pool}


# -- routing by modality ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["image", "text", "pair"])
def test_tokens_reach_only_their_modality_pool(kind: str) -> None:
    model = make()
    cfg, k = model.cfg, model.cfg.moe.top_k
    images, text = batch(cfg)
    mask = torch.ones_like(text, dtype=torch.bool)
    mask[0, 5:] = False  # two padding tokens: never routed
    out = model(images if kind != "text" else None, text if kind != "image" else None,
                text_mask=mask if kind != "image" else None)  # fmt: skip
    n_img = 3 * (cfg.n_patches + 1) if kind != "text" else 0
    n_txt = int(mask.sum()) if kind != "image" else 0
    moe_blocks = [i for i in range(cfg.n_layers) if cfg.is_moe_block(i)]
    assert moe_blocks == [1, 3] and cfg.is_vl_block(3) and not cfg.is_vl_block(1)
    # bottom MoE block: each pool sees exactly its modality's tokens, k choices each
    v, t = pool_totals(out, "v"), pool_totals(out, "t")
    assert v.get(1, 0) == n_img * k and t.get(1, 0) == n_txt * k
    # top (VL) MoE block: image-text tokens go to the VL-FFN, so neither pool sees them
    expect_top = 0 if kind == "pair" else None
    assert v.get(3, 0) == (expect_top if expect_top is not None else n_img * k)
    assert t.get(3, 0) == (expect_top if expect_top is not None else n_txt * k)
    if kind == "text":
        assert sum(v.values()) == 0
    if kind == "image":
        assert sum(t.values()) == 0
    assert out.aux_loss.ndim == 0 and torch.isfinite(out.aux_loss) and torch.isfinite(out.z_loss)


def test_image_tokens_never_reach_a_text_expert() -> None:
    """Corrupting every T-expert leaves an image-only forward unchanged, and V-experts a text-only one."""
    model = make()
    images, text = batch(model.cfg)
    ref_img, ref_txt = model(images).image_logits, model(None, text).text_logits
    with torch.no_grad():
        for name, layer in model.moe_layers:
            if name.endswith("t_ffn"):
                layer.experts.w_out.fill_(1e3)
    assert torch.equal(model(images).image_logits, ref_img)
    assert not torch.allclose(model(None, text).text_logits, ref_txt)
    model = make()
    with torch.no_grad():
        for name, layer in model.moe_layers:
            if name.endswith("v_ffn"):
                layer.experts.w_out.fill_(1e3)
    assert torch.equal(model(None, text).text_logits, ref_txt)


# -- the VL-FFN ------------------------------------------------------------------------------------------


def test_vl_ffn_serves_only_image_text_inputs() -> None:
    model = make()
    images, text = batch(model.cfg)
    rows: list[int] = []
    vl = model.blocks[-1].vl_ffn
    handle = vl.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0] * inp[0].shape[1]))
    out_img, out_txt, out_pair = model(images), model(None, text), model(images, text)
    handle.remove()
    assert rows == [3 * (model.cfg.n_patches + 1 + 7)]  # once, for the pair batch, every token
    assert all(b.vl_ffn is None for b in model.blocks[:-1])
    with torch.no_grad():
        vl.w_out.weight.zero_()
    assert torch.equal(model(images).image_logits, out_img.image_logits)
    assert torch.equal(model(None, text).text_logits, out_txt.text_logits)
    assert not torch.allclose(model(images, text).text_logits, out_pair.text_logits)


# -- masked image modeling -------------------------------------------------------------------------------


def test_image_mask_replaces_exactly_the_masked_patches() -> None:
    model = make()
    images, text = batch(model.cfg)
    n = model.cfg.n_patches
    none = model(images, text)
    all_false = model(images, text, image_mask=torch.zeros(3, n, dtype=torch.bool))
    assert torch.equal(none.image_logits, all_false.image_logits)
    assert torch.equal(none.text_logits, all_false.text_logits)
    mask = torch.zeros(3, n, dtype=torch.bool)
    mask[0, [2, 5]] = True
    masked = model(images, text, image_mask=mask)
    assert torch.equal(masked.image_logits[1:], none.image_logits[1:])  # other samples untouched
    assert not torch.allclose(masked.image_logits[0], none.image_logits[0])
    # the masked patches' pixels no longer matter; an unmasked patch's pixels do
    changed = images.clone()
    changed[0, :, 0:8, 16:24] += 1.0  # patch 2 (row 0, column 2 of the 4x4 grid)
    assert torch.equal(model(changed, text, image_mask=mask).image_logits, masked.image_logits)
    assert not torch.allclose(model(changed, text).image_logits, none.image_logits)


# -- parameter counts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", "small"])
def test_param_counts_of_named_configs(name: str) -> None:
    cfg = load_cfg(name)
    with torch.device("meta"):
        model = VLMoE(cfg)
    total, active = model.num_params(), model.num_active_params()
    print(f"\nVL-MoE {name}: {total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active per token")
    # the count by hand: one pool's top_k experts per MoE block instead of both pools' experts
    per_expert = 2 * cfg.d_model * cfg.ffn_dim
    routed = cfg.num_moe_blocks * (cfg.num_v_experts + cfg.num_t_experts) * per_expert
    assert active == total - routed + cfg.num_moe_blocks * cfg.moe.top_k * per_expert
    if name in PAPER:
        paper_total, paper_active = PAPER[name]
        assert math.isclose(total, paper_total, rel_tol=0.05), total
        assert math.isclose(active, paper_active, rel_tol=0.05), active


# -- freezing the MoE ------------------------------------------------------------------------------------


def test_freeze_moe_keeps_routers_and_experts_bit_identical() -> None:
    model = make().train()
    freeze_moe(model)
    frozen = {n for n, _ in model.named_parameters() if ".v_ffn." in n or ".t_ffn." in n}
    frozen = {n for n in frozen if any(n.startswith(f"blocks.{i}.") for i in (1, 3))}
    assert any("router" in n for n in frozen) and any("experts" in n for n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    images, text = batch(model.cfg)
    half = torch.zeros(3, model.cfg.n_patches, dtype=torch.bool)
    half[:, ::2] = True
    for out in (model(images, text, image_mask=half), model(images), model(None, text)):
        loss = (
            out.text_logits.float().logsumexp(-1).mean() if out.text_logits is not None else 0
        ) + out.aux_loss
        if out.image_logits is not None:
            loss = loss + out.image_logits.float().logsumexp(-1).mean()
        loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert not p.requires_grad and p.grad is None and torch.equal(p, before[n]), n
        else:
            assert p.requires_grad and p.grad is not None and not torch.equal(p, before[n]), n


# -- config checks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"image_size": 30}, "model.image_size"),
        ({"visual_vocab_size": 0}, "model.visual_vocab_size"),
        ({"n_vl_layers": 5}, "model.n_vl_layers"),
        ({"num_t_experts": 0}, "model.num_t_experts"),
        ({"n_heads": 3}, "model.n_heads"),
        ({"moe": MoEConfig(top_k=5)}, "model.moe.top_k"),
    ],
)
def test_bad_config_names_the_key(override: dict, key: str) -> None:
    cfg = dataclasses.replace(load_cfg("tiny"), **override)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert err.value.key == key


def test_unknown_key_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        VLMoEConfig.from_dict(
            {**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "vl_tiny.yaml")), "n_layer": 2}
        )
    assert err.value.key == "model.n_layer"


# -- references ------------------------------------------------------------------------------------------


def reference_text_encoder(model: VLMoE, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A dense text-only VL-MoE written out by hand: pre-norm blocks, explicit softmax attention, T-FFN."""
    x = model.text_embed.weight[ids] + model.text_pos[0, : ids.shape[1]]
    H = model.cfg.n_heads
    for b in model.blocks:
        h = F.layer_norm(x, x.shape[-1:], b.ln_1.weight, b.ln_1.bias, b.ln_1.eps)
        q, k, v = (h @ b.attn.c_attn.weight.T + b.attn.c_attn.bias).unflatten(-1, (H, 3, -1)).unbind(-2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        att = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        x = (
            x
            + torch.einsum("bhqk,bkhd->bqhd", att, v).flatten(2) @ b.attn.c_proj.weight.T
            + b.attn.c_proj.bias
        )
        h = F.layer_norm(x, x.shape[-1:], b.ln_2.weight, b.ln_2.bias, b.ln_2.eps)
        x = x + F.gelu(h @ b.t_ffn.w_in.weight.T) @ b.t_ffn.w_out.weight.T
    h = F.layer_norm(x, x.shape[-1:], model.ln_f.weight, model.ln_f.bias, model.ln_f.eps)
    return h @ model.text_embed.weight.T


def test_dense_text_forward_matches_a_reference() -> None:
    model = make(moe_every=0, n_vl_layers=0).double()
    _, text = batch(model.cfg)
    mask = torch.ones_like(text, dtype=torch.bool)
    mask[1, 4:] = False
    out = model(None, text, text_mask=mask)
    ref = reference_text_encoder(model, text, mask)
    torch.testing.assert_close(out.text_logits[mask], ref[mask])
    assert out.moe_stats == [] and out.image_logits is None


def test_permuting_the_batch_permutes_the_outputs() -> None:
    model = make()
    images, text = batch(model.cfg, B=4)
    perm = torch.tensor([2, 0, 3, 1])
    out, out_p = model(images, text), model(images[perm], text[perm])
    torch.testing.assert_close(out_p.text_logits, out.text_logits[perm])
    torch.testing.assert_close(out_p.image_logits, out.image_logits[perm])


def test_output_shapes() -> None:
    model = make()
    cfg = model.cfg
    images, text = batch(cfg)
    out = model(images, text)
    assert out.text_logits.shape == (3, 7, cfg.text_vocab_size)
    assert out.image_logits.shape == (3, cfg.n_patches, cfg.visual_vocab_size)
    assert model(images).text_logits is None and model(None, text).image_logits is None


def test_token_params_count_one_ffn_branch_per_block() -> None:
    """One token's path: a dense model of the same shape has the MoE model's figure but for the routers."""
    cfg = tiny(moe=MoEConfig(top_k=1))
    moe, dense = make(**{"moe": MoEConfig(top_k=1)}), make(moe_every=0, moe=MoEConfig(top_k=1))
    ffn = sum(p.numel() for p in dense.blocks[0].v_ffn.parameters())
    # the dense model keeps V, T (and VL) FFNs of one size in every block; a token uses one per block
    assert dense.num_token_params() == dense.num_params() - (cfg.n_layers + cfg.n_vl_layers) * ffn
    routers = sum(b.v_ffn.router.weight.numel() for b in moe.blocks if b.is_moe)  # both pools' routers are alike
    assert moe.num_token_params() - dense.num_token_params() == routers
    assert dense.num_active_params() - moe.num_active_params() > 0  # the paper's count: every dense FFN
