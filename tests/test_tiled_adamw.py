"""TiledAdamW: bit-identical to torch's single-tensor AdamW, interchangeable state dicts, config checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

from distill.config import OptimConfig
from distill.errors import ConfigError
from distill.losses import lm_loss
from distill.models import GPT, ModelConfig, configure_optimizer_groups
from distill.moe import MoEConfig
from distill.train.optim import WHOLE, build_optimizer
from distill.train.tiled_adamw import TiledAdamW

HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def make_model(seed: int = 0, d_model: int = 32) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        name="test", vocab_size=64, d_model=d_model, n_layers=4, n_heads=2, max_seq_len=32, moe_every=2,
        num_experts=[2, 4], moe=MoEConfig(top_k=1, residual=True, dropless=True),
    )  # fmt: skip
    return GPT(cfg)


def backward(model: GPT, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 64, (2, 12), generator=gen)
    out = model(idx[:, :-1])
    (lm_loss(out.logits, idx[:, 1:]) + 0.01 * out.aux_loss + 0.001 * out.z_loss).backward()


def train(model: GPT, opt: torch.optim.Optimizer, steps: int, first_seed: int = 0) -> None:
    for s in range(first_seed, first_seed + steps):
        opt.zero_grad(set_to_none=True)
        backward(model, s)
        opt.step()


def assert_same(m1: GPT, o1: torch.optim.Optimizer, m2: GPT, o2: torch.optim.Optimizer) -> None:
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2), name
        for key in STATE_KEYS:
            a, b = o1.state[p1][key], o2.state[p2][key]
            assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, (name, key)
            assert torch.equal(a, b), (name, key)


def pair(tile_size: int, d_model: int = 32) -> tuple[GPT, torch.optim.Optimizer, GPT, torch.optim.Optimizer]:
    ref, tiled = make_model(d_model=d_model), make_model(d_model=d_model)
    ref_opt = torch.optim.AdamW(configure_optimizer_groups(ref, 0.1), **HP, foreach=False)
    tiled_opt = TiledAdamW(configure_optimizer_groups(tiled, 0.1), **HP, tile_size=tile_size)
    return ref, ref_opt, tiled, tiled_opt


@pytest.mark.parametrize("tile_size", [1, 7, 4096, 1 << 30])
def test_bit_identical_to_torch_adamw(tile_size):
    # tile 1 walks every element on its own (~7 ops each): a narrower model keeps it to seconds
    ref, ref_opt, tiled, tiled_opt = pair(tile_size, d_model=16 if tile_size == 1 else 32)
    assert tile_size == 1 or max(p.numel() for p in ref.parameters()) > 4096  # 4096 splits some tensors
    train(ref, ref_opt, 3)
    train(tiled, tiled_opt, 3)
    assert_same(ref, ref_opt, tiled, tiled_opt)
    assert [g["weight_decay"] for g in tiled_opt.param_groups] == [0.1, 0.0]


def test_cpu_default_adamw_is_the_same_path():
    """On CPU torch's default (foreach=None) resolves to the single-tensor path: also bit-identical."""
    ref, tiled = make_model(), make_model()
    ref_opt = torch.optim.AdamW(configure_optimizer_groups(ref, 0.1), **HP)
    tiled_opt = TiledAdamW(configure_optimizer_groups(tiled, 0.1), **HP, tile_size=7)
    train(ref, ref_opt, 3)
    train(tiled, tiled_opt, 3)
    assert_same(ref, ref_opt, tiled, tiled_opt)


@pytest.mark.parametrize("direction", ["torch->tiled", "tiled->torch"])
def test_state_dict_round_trip(direction):
    ref, ref_opt, tiled, tiled_opt = pair(64)
    src, src_opt, dst, dst_opt = (ref, ref_opt, tiled, tiled_opt) if direction == "torch->tiled" else (
        tiled, tiled_opt, ref, ref_opt)  # fmt: skip
    train(ref, ref_opt, 2)
    train(tiled, tiled_opt, 2)
    assert_same(ref, ref_opt, tiled, tiled_opt)
    saved = copy.deepcopy(src_opt.state_dict())
    assert set(saved["state"][0]) == set(STATE_KEYS) and saved["state"][0]["step"].dtype == torch.float32
    assert set(saved["param_groups"][0]) == set(dst_opt.state_dict()["param_groups"][0])
    dst_opt.load_state_dict(saved)
    # both continue from the same point and stay identical
    train(src, src_opt, 2, first_seed=2)
    train(dst, dst_opt, 2, first_seed=2)
    assert_same(ref, ref_opt, tiled, tiled_opt)


def test_lr_scheduler_and_distributed_state_dict():
    ref, ref_opt, tiled, tiled_opt = pair(100)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)) for o in (ref_opt, tiled_opt)]
    for s in range(3):
        for model, opt, sched in ((ref, ref_opt, scheds[0]), (tiled, tiled_opt, scheds[1])):
            opt.zero_grad()
            backward(model, s)
            opt.step()
            sched.step()
    assert tiled_opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == HP["lr"] / 4
    assert_same(ref, ref_opt, tiled, tiled_opt)
    # torch.distributed.checkpoint's (model, optimizer) API, also on a fresh optimizer (lazy init step)
    fresh_model = make_model(1)
    fresh = TiledAdamW(configure_optimizer_groups(fresh_model, 0.1), **HP, tile_size=100)
    before = [p.detach().clone() for p in fresh_model.parameters()]
    sd = get_optimizer_state_dict(fresh_model, fresh)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh_model.parameters(), strict=True))
    sd = get_optimizer_state_dict(tiled, tiled_opt)
    assert any(torch.equal(v["exp_avg"], tiled_opt.state[next(tiled.parameters())]["exp_avg"])
               for v in sd["state"].values())
    set_optimizer_state_dict(ref, ref_opt, sd)
    assert_same(ref, ref_opt, tiled, tiled_opt)


def test_dtensor_params():
    """FSDP2-style DTensor parameters (1-rank gloo mesh, in this process): updated via `.to_local()`."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        shapes = [(6, 40, 50), (300,), (50, 40)]
        plain = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain]
        ref_opt = torch.optim.AdamW(plain, **HP, weight_decay=0.1, foreach=False)
        opt = TiledAdamW(sharded, **HP, weight_decay=0.1, tile_size=333)
        for _ in range(3):
            for p, d in zip(plain, sharded, strict=True):
                p.grad = torch.randn(p.shape)
                d.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
            ref_opt.step()
            opt.step()
        for p, d in zip(plain, sharded, strict=True):
            assert isinstance(opt.state[d]["exp_avg"], DTensor)
            assert torch.equal(p, d.full_tensor())
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(ref_opt.state[p][key], opt.state[d][key].full_tensor())
        # the app's optimizer on CPU: torch's fused AdamW, plain or on a mesh; without the fused step, on a mesh
        # whole local shards (no DTensor dispatch per op), plain torch's single-tensor AdamW
        on_mesh, plain_module = torch.nn.Module(), torch.nn.Module()
        on_mesh.w, plain_module.w = sharded[2], plain[2]
        for module in (on_mesh, plain_module):
            opt = build_optimizer(module, OptimConfig(), 4)[0]
            assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
        assert build_optimizer(on_mesh, OptimConfig(), 4, fused=False)[0].tile_size == WHOLE
        unfused = build_optimizer(plain_module, OptimConfig(), 4, fused=False)[0]
        assert type(unfused) is torch.optim.AdamW and not unfused.defaults["fused"]
    finally:
        dist.destroy_process_group()


def test_non_contiguous_params_tile_by_rows():
    """Transposed (non-contiguous) parameters and states: tiled along dim 0, still bit-identical."""
    torch.manual_seed(0)
    layouts = [torch.randn(70, 30).t(), torch.randn(5, 6, 7).transpose(0, 2), torch.randn(40, 3)]
    plain = [torch.nn.Parameter(torch.empty_strided(t.shape, t.stride()).copy_(t)) for t in layouts]
    tiled = [torch.nn.Parameter(torch.empty_strided(t.shape, t.stride()).copy_(t)) for t in layouts]
    assert [p.is_contiguous() for p in tiled] == [False, False, True]
    ref_opt = torch.optim.AdamW(plain, **HP, weight_decay=0.1, foreach=False)
    opt = TiledAdamW(tiled, **HP, weight_decay=0.1, tile_size=100)
    for _ in range(3):
        for p, q in zip(plain, tiled, strict=True):
            g = torch.randn(p.shape)
            p.grad = torch.empty_strided(p.shape, p.stride()).copy_(g)
            q.grad = torch.empty_strided(q.shape, q.stride()).copy_(g)
        ref_opt.step()
        opt.step()
    for p, q in zip(plain, tiled, strict=True):
        assert torch.equal(p, q) and opt.state[q]["exp_avg"].stride() == q.stride()
        assert all(torch.equal(ref_opt.state[p][k], opt.state[q][k]) for k in STATE_KEYS)


def test_build_optimizer_uses_tile_size():
    """Through `build_optimizer` with its LR schedule: tiled vs untiled (torch's single-tensor AdamW)."""
    ref, tiled = make_model(), make_model()
    ref_opt, ref_sched = build_optimizer(ref, OptimConfig(warmup_steps=2), max_steps=6, fused=False)
    opt, sched = build_optimizer(tiled, OptimConfig(warmup_steps=2, tile_size=7).validate(), max_steps=6)
    assert type(ref_opt) is torch.optim.AdamW and isinstance(opt, TiledAdamW) and opt.tile_size == 7
    for s in range(4):
        for model, o, sc in ((ref, ref_opt, ref_sched), (tiled, opt, sched)):
            o.zero_grad()
            backward(model, s)
            o.step()
            sc.step()
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] < OptimConfig().lr
    assert_same(ref, ref_opt, tiled, opt)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_bad_tile_size(bad):
    with pytest.raises(ConfigError, match="optim.tile_size"):
        OptimConfig(tile_size=bad).validate()
    with pytest.raises(ValueError, match="tile_size"):
        TiledAdamW([torch.nn.Parameter(torch.zeros(2))], tile_size=bad)
    OptimConfig(tile_size=None).validate()
    OptimConfig(tile_size=1).validate()


@pytest.mark.parametrize("flag", ["amsgrad", "maximize"])
def test_unsupported_flags_rejected(flag):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=flag):
        TiledAdamW([p], **{flag: True})
    opt = TiledAdamW([p])
    opt.param_groups[0][flag] = True  # e.g. loaded from such a torch.optim.AdamW checkpoint
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=flag):
        opt.step()


def test_fused_cpu_adamw_on_dtensors_equals_the_plain_update():
    """The app's CPU optimizer (torch's fused AdamW) on DTensor shards makes the update it makes on plain
    tensors, and both agree with the single-tensor AdamW to rounding."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        shapes = {"experts": (4, 40, 50), "norm": (300,), "proj": (50, 40)}
        torch.manual_seed(0)
        start = {k: torch.randn(v) for k, v in shapes.items()}
        ref, plain, sharded = torch.nn.Module(), torch.nn.Module(), torch.nn.Module()
        for k, v in start.items():
            ref.register_parameter(k, torch.nn.Parameter(v.clone()))
            plain.register_parameter(k, torch.nn.Parameter(v.clone()))
            sharded.register_parameter(k, torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [Shard(0)])))
        opts = [build_optimizer(m, OptimConfig(lr=3e-3, warmup_steps=0), 10, fused=f)[0]
                for m, f in ((ref, False), (plain, True), (sharded, True))]
        assert [bool(o.defaults["fused"]) for o in opts] == [False, True, True]
        for _ in range(3):
            for k, v in shapes.items():
                g = torch.randn(v)
                ref.get_parameter(k).grad, plain.get_parameter(k).grad = g.clone(), g.clone()
                sharded.get_parameter(k).grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            for opt in opts:
                opt.step()
        for k, v in start.items():
            r, p, q = ref.get_parameter(k), plain.get_parameter(k), sharded.get_parameter(k)
            assert isinstance(q, DTensor) and torch.equal(p, q.full_tensor()), k
            torch.testing.assert_close(p, r, rtol=0, atol=1e-6)
            assert (p - v).abs().max() > 3e-3  # three steps of lr 3e-3 moved every tensor: not a vacuous match
            assert isinstance(opts[2].state[q]["exp_avg"], DTensor)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("precision, fused", [("32-true", True), ("bf16-mixed", False)])
def test_lightning_optimizers_fuse_except_under_mixed_precision(precision, fused):
    """Lightning's mixed-precision plugin refuses to clip a fused optimizer's gradients: there, not fused."""
    import lightning as L

    from distill.train.optim import lightning_optimizers

    module = L.LightningModule()
    module.trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False)
    got = lightning_optimizers(module, make_model(), OptimConfig(), 10)
    assert bool(got["optimizer"].defaults["fused"]) is fused and got["lr_scheduler"]["interval"] == "step"
