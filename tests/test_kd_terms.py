"""Internal KD: router KD and hidden-state KD, their maps, config checks and their place in the staged schedule."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from distill.config import OptimConfig
from distill.errors import ConfigError
from distill.kd import KDConfig, KDSchedule, default_block_map, expert_map, hidden_kd_loss, router_kd_loss
from distill.models import GPT, ModelConfig
from distill.moe import MoELayer, MoEStats
from distill.moe.config import MoEConfig
from distill.train.distill_module import DistillModule
from distill.train.loss_log import LOSS_TERMS, StepLossRecorder, read_loss_rows
from students.config import StudentConfig
from students.mos import default_teacher_layers, derive_student

V, L_SEQ = 61, 16


def teacher_cfg() -> ModelConfig:
    return ModelConfig.from_dict(dict(name="t", vocab_size=V, d_model=32, n_layers=4, n_heads=2, max_seq_len=L_SEQ,
                                      num_experts=[2, 4], moe=dict(top_k=1, residual=True))).validate()


class RandomBlocks(Dataset):
    def __init__(self, n: int = 32, seed: int = 0):
        self.data = torch.randint(0, V, (n, L_SEQ + 1), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i]}


@pytest.fixture(scope="module")
def teacher() -> GPT:
    torch.manual_seed(0)
    return GPT(teacher_cfg()).eval().requires_grad_(False)


def make_module(teacher: GPT, student_cfg: ModelConfig, max_steps: int = 4, **kd) -> DistillModule:
    kd.setdefault("stop_step", None)
    return DistillModule(student_cfg, OptimConfig(warmup_steps=1), KDSchedule(KDConfig(**kd), max_steps),
                         teacher_loader=lambda: copy.deepcopy(teacher))


def copy_of(teacher: GPT, module: DistillModule) -> None:
    module.model.load_state_dict(teacher.state_dict())


def batch_inputs(seed: int = 1) -> torch.Tensor:
    return RandomBlocks(4, seed).data[:, :-1]


def internal(module: DistillModule, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    k = module.schedule.cfg
    flags = dict(return_router_logits=k.router_weight > 0, return_hidden=k.hidden_weight > 0)
    out = module.model(inputs, **flags)
    t_out = module.teacher_outputs(inputs, router=flags["return_router_logits"], hidden=flags["return_hidden"])
    return {name: value.detach() for name, value in module.internal_terms(out, t_out, mask).items()}


# ----------------------------------------------------------------------------------------------- the model


def test_default_forward_has_no_router_logits_or_hidden(teacher):
    out = teacher(batch_inputs())
    assert out.hidden_states is None
    assert out.moe_stats and all(s.router_logits is None for s in out.moe_stats)
    # old-style constructors still work
    z = torch.zeros(())
    assert MoEStats(z, z, torch.zeros(2, dtype=torch.long), z).router_logits is None


def test_forward_flags_give_logits_and_hidden(teacher):
    x = batch_inputs()
    out = teacher(x, return_router_logits=True, return_hidden=True)
    assert len(out.hidden_states) == 4 and out.hidden_states[-1].shape == (4, L_SEQ, 32)
    assert [tuple(s.router_logits.shape) for s in out.moe_stats] == [(4 * L_SEQ, 2), (4 * L_SEQ, 4)]
    assert all(s.router_logits.dtype == torch.float32 for s in out.moe_stats)
    torch.testing.assert_close(out.logits, teacher(x).logits, rtol=0, atol=0)
    # the last hidden state is the input of the final norm
    torch.testing.assert_close(teacher.lm_head(teacher.ln_f(out.hidden_states[-1])), out.logits)


def test_router_logits_are_clean_under_jitter():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, MoEConfig(top_k=1, jitter_eps=0.5)).train()
    x = torch.randn(2, 5, 8)
    _, stats = layer(x, return_router_logits=True)
    torch.testing.assert_close(stats.router_logits, F.linear(x.reshape(-1, 8), layer.router.weight))


# ----------------------------------------------------------------------------------------------- router KD


def test_router_kd_zero_for_copy_positive_otherwise(teacher):
    student_cfg = derive_student(teacher_cfg(), StudentConfig(n_layers=4))
    module = make_module(teacher, student_cfg, router_weight=1.0)
    copy_of(teacher, module)
    assert float(internal(module, batch_inputs())["router_kd"]) == 0.0
    torch.manual_seed(5)
    other = make_module(teacher, student_cfg, router_weight=1.0)
    assert float(internal(other, batch_inputs())["router_kd"]) > 1e-4


def naive_router_kd(s_logits, t_logits, emap, mask):
    total, n = 0.0, 0
    for i in range(s_logits.shape[0]):
        if not mask[i]:
            continue
        p_t = torch.softmax(t_logits[i].double(), -1)
        target = torch.zeros(s_logits.shape[1], dtype=torch.float64)
        for e, j in enumerate(emap):
            if j >= 0:
                target[j] += p_t[e]
        target /= target.sum()
        p_s = torch.softmax(s_logits[i].double(), -1)
        total += sum(float(target[j] * (target[j].log() - p_s[j].log())) for j in range(len(target)) if target[j] > 0)
        n += 1
    return total / n


def test_router_kd_with_dropped_experts_matches_naive():
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(12, 3, generator=g), torch.randn(12, 5, generator=g)
    emap = expert_map(5, 3, [4, 0, 2])
    assert emap == [1, -1, 2, -1, 0]
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1], dtype=torch.bool).view(3, 4)
    got = router_kd_loss(s_logits, t_logits, mask, emap)
    assert abs(float(got) - naive_router_kd(s_logits, t_logits, emap, mask.flatten())) < 1e-5
    assert expert_map(4, 2) == [0, 1, -1, -1]  # default: the first N


def test_module_router_kd_uses_expert_maps(teacher):
    student_cfg = replace(derive_student(teacher_cfg(), StudentConfig(n_layers=2)), num_experts=[3])
    module = make_module(teacher, student_cfg, router_weight=1.0)
    module.expert_maps = {0: [3, 0, 1]}
    x = batch_inputs()
    mask = torch.rand(4, L_SEQ, generator=torch.Generator().manual_seed(2)) > 0.3
    got = internal(module, x, mask)["router_kd"]
    s = module.model(x, return_router_logits=True).moe_stats[0].router_logits
    t = teacher(x, return_router_logits=True).moe_stats[1].router_logits  # default map: the last teacher MoE layer
    expected = naive_router_kd(s.detach(), t, [1, 2, -1, 0], mask.flatten())
    assert abs(float(got) - expected) < 1e-5


def _stored(t_logits: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    from distill.kd.targets import _top_routes

    return _top_routes(t_logits, r)


def naive_routes_kd(s_logits, t_logits, r, emap, mask):
    """Textbook KL on buckets {the stored teacher experts the map keeps, the rest}, one token at a time."""
    total, n = 0.0, 0
    for i in range(s_logits.shape[0]):
        if not mask[i]:
            continue
        p_t, p_s = torch.softmax(t_logits[i].double(), -1), torch.softmax(s_logits[i].double(), -1)
        top = torch.argsort(p_t, descending=True)[:r].tolist()
        kept = {emap[e]: float(p_t[e]) for e in top if emap[e] >= 0}
        rest_q = sum(float(p_s[j]) for j in range(len(p_s)) if j not in kept)
        rest_p = 0.0 if len(top) == len(emap) or rest_q == 0 else 1.0 - sum(float(p_t[e]) for e in top)
        z = sum(kept.values()) + rest_p
        kl = sum(p / z * math.log(p / z / float(p_s[j])) for j, p in kept.items() if p > 0)
        if rest_p > 0:
            kl += rest_p / z * math.log(rest_p / z / rest_q)
        total, n = total + kl, n + 1
    return total / n


@pytest.mark.parametrize("r", [2, 5])
@pytest.mark.parametrize("emap", [None, [1, -1, 2, -1, 0]])
def test_router_kd_from_stored_routes(r, emap):
    """Offline router KD against a naive bucket reference; with every expert stored (r = E) it is the
    online `router_kd_loss` exactly; zero for a student router that copies the teacher's."""
    from distill.kd.internal import router_kd_from_routes

    g = torch.Generator().manual_seed(3)
    n_s = 5 if emap is None else 3
    s_logits, t_logits = torch.randn(12, n_s, generator=g), torch.randn(12, 5, generator=g) * 2
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    ids, logp = _stored(t_logits, r)
    got = router_kd_from_routes(s_logits, ids, logp, mask, emap)
    ref = naive_routes_kd(s_logits, t_logits, r, emap or list(range(5)), mask)
    assert got > 1e-3 and abs(float(got) - ref) < 1e-5
    if r == 5:
        assert abs(float(got) - float(router_kd_loss(s_logits, t_logits, mask, emap))) < 1e-6
    if emap is None:
        assert abs(float(router_kd_from_routes(t_logits, ids, logp, mask))) < 1e-6
    x = s_logits.clone().requires_grad_(True)
    router_kd_from_routes(x, ids, logp, mask, emap).backward()
    assert torch.isfinite(x.grad).all() and x.grad[~mask].abs().max() == 0


def test_router_kd_from_routes_with_padding_and_every_student_expert_covered():
    """A layer with fewer experts than r stores -inf padding; a student whose experts are all among the
    mapped stored ones has no rest bucket: finite, with a finite gradient."""
    from distill.kd.internal import router_kd_from_routes

    g = torch.Generator().manual_seed(4)
    t_logits, s_logits = torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g).requires_grad_(True)
    ids, logp = _stored(t_logits, 4)  # r = 4 > E = 3: one padded column
    assert (logp[:, 3] == float("-inf")).all()
    loss = router_kd_from_routes(s_logits, ids, logp, None, [0, 1, -1])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_logits.grad).all()
    assert abs(float(loss.detach()) - float(router_kd_loss(s_logits.detach(), t_logits, None, [0, 1, -1]))) < 1e-6


# ----------------------------------------------------------------------------------------------- hidden KD


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_kd_zero_for_copy_positive_otherwise(teacher, kind):
    student_cfg = derive_student(teacher_cfg(), StudentConfig(n_layers=4))
    module = make_module(teacher, student_cfg, hidden_weight=1.0, hidden_loss=kind)
    copy_of(teacher, module)
    assert module.hidden_proj is None
    assert float(internal(module, batch_inputs())["hidden_kd"]) == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(7)
    other = make_module(teacher, student_cfg, hidden_weight=1.0, hidden_loss=kind)
    assert float(internal(other, batch_inputs())["hidden_kd"]) > 1e-5


def test_hidden_kd_loss_matches_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    mse = ((s - t) ** 2).mean(-1)[mask].mean()
    cos = (1 - F.cosine_similarity(s, t, dim=-1))[mask].mean()
    torch.testing.assert_close(hidden_kd_loss(s, t, mask, "mse"), mse)
    torch.testing.assert_close(hidden_kd_loss(s, t, mask, "cosine"), cos)


def test_default_block_map_is_the_mos_mapping():
    student = derive_student(teacher_cfg(), StudentConfig(n_layers=2))
    assert default_block_map(teacher_cfg(), student) == default_teacher_layers(teacher_cfg(), student) == [2, 3]


def narrow_student() -> ModelConfig:
    return replace(derive_student(teacher_cfg(), StudentConfig(n_layers=2)), d_model=16).validate()


def trainer(tmp_path: Path, max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path),
                     log_every_n_steps=1, **kw)


def test_projection_for_different_widths(teacher, tmp_path):
    module = DistillModule(narrow_student(), OptimConfig(warmup_steps=1, lr=1e-2),
                           KDSchedule(KDConfig(hidden_weight=1.0), 2),
                           teacher_loader=lambda: copy.deepcopy(teacher), teacher_cfg=teacher_cfg())
    assert module.hidden_proj is not None and module.hidden_proj.weight.shape == (32, 16)
    assert not any(k.startswith("hidden_proj") for k in module.model.state_dict())
    assert "hidden_proj.weight" in module.state_dict()
    before = module.hidden_proj.weight.detach().clone()
    t = trainer(tmp_path, 2)
    t.fit(module, train_dataloaders=DataLoader(RandomBlocks(), batch_size=4))
    assert not torch.equal(before, module.hidden_proj.weight.detach())
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert id(module.hidden_proj.weight) in opt_params
    module.expert_maps = {0: [3, 2, 1, 0]}
    t.save_checkpoint(tmp_path / "c.ckpt")
    loaded = DistillModule.load_from_checkpoint(tmp_path / "c.ckpt", map_location="cpu")
    assert loaded.expert_maps == {0: [3, 2, 1, 0]}
    assert torch.equal(loaded.hidden_proj.weight, module.hidden_proj.weight)


def test_projection_still_gets_a_gradient_after_the_stop_step(teacher, tmp_path):
    """After the KD stop step the projection is unused; a zero term keeps a gradient on it (zeros), which DDP
    needs: its reducer waits for every parameter it was built with."""
    module = DistillModule(narrow_student(), OptimConfig(warmup_steps=1), KDSchedule(KDConfig(hidden_weight=1.0,
                           stop_step=1), 3), teacher_loader=lambda: copy.deepcopy(teacher), teacher_cfg=teacher_cfg())
    grads = []

    class Grads(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            grads.append(pl_module.hidden_proj.weight.grad.clone())

    trainer(tmp_path, 3, callbacks=[Grads()]).fit(module, train_dataloaders=DataLoader(RandomBlocks(), batch_size=4))
    assert len(grads) == 3 and grads[0].abs().max() > 0  # KD on at step 0
    assert module.teacher_released and all(g.abs().max() == 0 for g in grads[1:])


def test_different_widths_without_teacher_architecture_is_an_error(teacher):
    module = make_module(teacher, narrow_student(), hidden_weight=1.0)
    with pytest.raises(ConfigError) as err:
        internal(module, batch_inputs())
    assert err.value.key == "kd.hidden_weight"


# ----------------------------------------------------------------------------------------------- the schedule


def test_terms_follow_the_schedule_and_reach_losses_jsonl(teacher, tmp_path):
    student_cfg = derive_student(teacher_cfg(), StudentConfig(n_layers=2))
    module = make_module(teacher, student_cfg, stop_step=2, router_weight=0.5, hidden_weight=0.5)
    path = tmp_path / "losses.jsonl"
    trainer(tmp_path, 4, callbacks=[StepLossRecorder(path)]).fit(
        module, train_dataloaders=DataLoader(RandomBlocks(), batch_size=4))
    rows = read_loss_rows(path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    o = module.optim
    for r in rows[:2]:
        assert r["router_kd"] > 0 and r["hidden_kd"] > 0 and r["kd"] > 0
        total = r["ce"] + r["kd"] + 0.5 * r["router_kd"] + 0.5 * r["hidden_kd"] + o.aux_coef * r["aux"] + o.z_coef * r["z"]
        assert r["loss"] == pytest.approx(total, rel=1e-5)
    for r in rows[2:]:
        assert r["router_kd"] == 0.0 and r["hidden_kd"] == 0.0 and r["kd"] == 0.0
    assert module.teacher is None and module.teacher_released


def test_rows_without_internal_terms(teacher, tmp_path):
    """Weights 0 (the default): no flags reach either model, the rows have no internal terms."""
    student_cfg = derive_student(teacher_cfg(), StudentConfig(n_layers=2))
    module = make_module(teacher, student_cfg, stop_step=1)
    seen: list[dict] = []
    module.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    path = tmp_path / "losses.jsonl"
    trainer(tmp_path, 2, callbacks=[StepLossRecorder(path)]).fit(
        module, train_dataloaders=DataLoader(RandomBlocks(), batch_size=4))
    assert seen and all(kw == {"return_logits": False} for kw in seen)  # the fused head: hidden states, no logits
    rows = read_loss_rows(path)
    assert len(rows) == 2 and all("router_kd" not in r and "hidden_kd" not in r for r in rows)
    assert {"router_kd", "hidden_kd"} <= set(LOSS_TERMS)
    path.write_text(json.dumps({"step": 0, "batch": 0, "loss": 1.0}) + "\n")  # an old-style row still reads
    assert read_loss_rows(path) == [{"step": 0, "batch": 0, "loss": 1.0}]


# ----------------------------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("key,value", [
    ("router_weight", -1.0), ("hidden_weight", -0.5), ("hidden_loss", "l1"), ("layer_map", [0, -1]),
    ("teacher_targets", "cached"), ("topk", 0), ("router_topk", 0),
])
def test_bad_keys_name_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        KDConfig(**{key: value})
    assert err.value.key == f"kd.{key}"


def test_offline_targets_refuse_hidden_kd_but_take_router_kd():
    with pytest.raises(ConfigError) as err:
        KDConfig(teacher_targets="offline", hidden_weight=0.5)
    assert err.value.key == "kd.teacher_targets" and "hidden" in err.value.problem
    assert KDConfig(teacher_targets="offline", router_weight=0.5).router_weight == 0.5


@pytest.mark.parametrize("layer_map", [[2], [0, 1]])
def test_layer_map_checked_against_the_teacher(teacher, layer_map):
    student_cfg = derive_student(teacher_cfg(), StudentConfig(n_layers=2))
    with pytest.raises(ConfigError) as err:
        DistillModule(student_cfg, OptimConfig(), KDSchedule(KDConfig(router_weight=1.0, layer_map=layer_map), 2),
                      teacher_loader=lambda: teacher, teacher_cfg=teacher_cfg())
    assert err.value.key == "kd.layer_map"


def test_explicit_layer_map(teacher):
    student_cfg = replace(derive_student(teacher_cfg(), StudentConfig(n_layers=2)), num_experts=[2])
    module = make_module(teacher, student_cfg, router_weight=1.0, layer_map=[0])
    module.model.moe_layers[0].router.load_state_dict(teacher.moe_layers[0].router.state_dict())
    assert float(internal(module, batch_inputs())["router_kd"]) >= 0.0
    layer_map, maps, blocks = module._resolved_maps()
    assert layer_map == [0] and maps == [None] and blocks == [2, 3]


@pytest.mark.parametrize("terms, router, hidden", [("logit", 0.0, 0.0), ("router", 1.0, 0.0), ("hidden", 1.0, 1.0)])
def test_kd_terms_sweep_composes(terms: str, router: float, hidden: float) -> None:
    """conf/sweep/kd_terms.yaml: each `+kd_terms` option gives a valid kd node and a student from the teacher."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from distill.config import register_configs
    from distill.hydra_errors import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("distill", overrides=["+sweep=kd_terms", f"+kd_terms={terms}", "student.expert_selection=merge",
                                            "seed=2"])
    kd = OmegaConf.to_object(cfg.kd)
    assert (kd.router_weight, kd.hidden_weight, kd.stop_fraction) == (router, hidden, 0.7)
    assert (cfg.student.init, cfg.student.expert_selection) == ("teacher", "merge")
    assert cfg.data.seed == 2  # the seed reaches the data order (the student's init is the teacher's, not random)


# ----------------------------------------------------------------------------------------------- HF teachers


def test_router_kd_with_a_hugging_face_teacher(tmp_path):
    """Router KD needs the teacher's router logits: a Hugging Face teacher is then loaded as our GPT
    (TeacherLoader.internals), and the router KD equals the one computed from transformers' own router
    logits (output_router_logits) for the same tokens."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from teachers.base import TeacherLoader
    from teachers.hf import HFTeacher

    torch.manual_seed(0)
    hf_cfg = MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=L_SEQ, tie_word_embeddings=False)
    hf = MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)  # decisive, non-uniform routers
    hf.save_pretrained(tmp_path / "mixtral")
    source = HFTeacher(tmp_path / "mixtral")
    teacher = TeacherLoader(source, internals=True)()
    assert isinstance(teacher, GPT)
    student_cfg = replace(source.architecture(), n_layers=1, num_experts=[4])
    module = DistillModule(student_cfg, OptimConfig(warmup_steps=1), KDSchedule(KDConfig(router_weight=1.0,
                           stop_step=None), 4), teacher_loader=TeacherLoader(source, internals=True))
    x = batch_inputs()
    got = internal(module, x)["router_kd"]
    s = module.model(x, return_router_logits=True).moe_stats[0].router_logits
    with torch.no_grad():
        t = hf(x, output_router_logits=True).router_logits[-1]  # default map: the deepest teacher MoE layer
    assert float(got) > 1e-3
    assert abs(float(got) - float(router_kd_loss(s.detach(), t.reshape(-1, 4)))) < 1e-5
