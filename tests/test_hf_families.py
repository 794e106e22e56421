"""Hugging Face MoE families beyond Mixtral / Qwen2-MoE: Qwen3-MoE and OLMoE (q/k norms, any set of dense
blocks, attention output biases, a head size of its own), scaled RoPE (linear, llama3, yarn), GPT-OSS
(attention sinks, alternating sliding-window / full layers, biased router and experts, clamped SwiGLU) and
DeepSeek-V2 / V3 (multi-head latent attention, first_k_dense_replace, shared experts, group-limited routing).

Tiny random checkpoints are built here with `save_pretrained` (no download); transformers' own modules are
the independent reference: every comparison is against their logits (fp32, 1e-5).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    OlmoeConfig,
    Qwen3MoeConfig,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from distill.errors import ConfigError
from distill.export import export_model
from distill.interop import (
    export_hf,
    export_hf_from_native,
    hf_config_from_model,
    hf_family,
    model_config_from_hf,
)
from distill.models import GPT, ModelConfig
from distill.models.rope import rope_frequencies
from distill.parallel.load import full_index
from students.config import StudentConfig
from students.mos import derive_student, init_student_from_teacher
from teachers.hf import HFTeacher

VOCAB = 96  # the student's vocabulary: the teachers below pad theirs past it
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0, "beta_slow": 1.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)

DEEPSEEK = dict(
    vocab_size=112, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=10,
    qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5, first_k_dense_replace=1, max_position_embeddings=64,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)

# Qwen3-MoE: dense block 1 between MoE blocks 0 and 2 (mlp_only_layers: no moe_every gives it), a head size
# of its own (4 x 12 != 32), attention biases on q/k/v and o, renormalised top-2, YaRN, untied head.
# "qwen3_moe_step": decoder_sparse_step=2, tied head, no renormalisation, linear RoPE scaling.
# OLMoE: q/k RMSNorm over the whole projections with grouped-query attention, Llama 3.1 RoPE, untied.
# GPT-OSS: attention sinks, sliding (window 5) / full / sliding layers, q/k/v/o biases, YaRN (no truncation),
# a head size of its own; biased router (top-k softmax), biased experts with a clamped SwiGLU (a limit
# these small activations reach).
# DeepSeek-V3: MLA (low-rank q, YaRN with mscales), a dense first block, sigmoid router with a choice bias,
# groups scored by their best two, renormalised, scaled gates, a shared expert. DeepSeek-V2: MLA with a plain
# q_proj and biases, softmax router limited to the best group by its best expert, two shared experts.
HF_CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **TINY, vocab_size=112, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
        decoder_sparse_step=1, mlp_only_layers=[1], head_dim=12, attention_bias=True, norm_topk_prob=True,
        rope_parameters={**YARN, "rope_theta": 10000.0},
    ),
    "qwen3_moe_step": lambda: Qwen3MoeConfig(
        **TINY, vocab_size=VOCAB, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2,
        decoder_sparse_step=2, norm_topk_prob=False, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    ),
    "olmoe": lambda: OlmoeConfig(
        **TINY, vocab_size=112, intermediate_size=16, num_hidden_layers=2, norm_topk_prob=False,
        rope_parameters={**LLAMA3, "rope_theta": 10000.0},
    ),
    "gpt_oss": lambda: GptOssConfig(
        **{k: v for k, v in TINY.items() if k != "num_experts"}, vocab_size=112, intermediate_size=16,
        num_hidden_layers=3, num_local_experts=4, head_dim=12, sliding_window=5, swiglu_limit=0.08,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 16, "rope_theta": 1000.0},
    ),
    "deepseek_v3": lambda: DeepseekV3Config(
        **DEEPSEEK, q_lora_rank=12, n_shared_experts=1, routed_scaling_factor=2.5, n_group=4, topk_group=2,
        norm_topk_prob=True, rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
                         "mscale_all_dim": 0.707, "beta_fast": 8, "beta_slow": 1, "rope_theta": 10000.0},
    ),
    "deepseek_v2": lambda: DeepseekV2Config(
        **DEEPSEEK, q_lora_rank=None, n_shared_experts=2, routed_scaling_factor=1.5, n_group=2, topk_group=1,
        topk_method="group_limited_greedy", attention_bias=True, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 500.0},
    ),
}
FAMILY = {name: name for name in HF_CONFIGS} | {"qwen3_moe_step": "qwen3_moe"}
QK_NORM = {"qwen3_moe": "head", "olmoe": "full"}


@torch.no_grad()
def spread_from_defaults(model: torch.nn.Module) -> torch.nn.Module:
    """Norm gains (q/k norms included), biases, sinks and routers drawn away from their defaults (a
    conversion that drops or misplaces them shows); routing decisive, with no near-ties between experts."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.uniform_(0.5, 1.5)
        elif name.endswith((".bias", "sinks")):
            p.normal_(0.0, 0.3)
        elif name.endswith(("mlp.gate.weight", "router.weight")):
            p.normal_(0.0, 0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0.0, 0.1)
    return model


def build_checkpoint(config, out: Path) -> Path:
    torch.manual_seed(0)
    spread_from_defaults(AutoModelForCausalLM.from_config(config)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_families")
    return {name: build_checkpoint(make(), root / name) for name, make in HF_CONFIGS.items()}


def reference(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_ids(vocab: int, shape=(2, 20), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ rotary scaling


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    LLAMA3,
    {**LLAMA3, "factor": 32.0, "original_max_position_embeddings": 8192},
    YARN,
    {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
     "beta_slow": 1.0, "truncate": False},  # GPT-OSS's
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
     "mscale_all_dim": 0.707},  # DeepSeek-V3's fields
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "attention_factor": 1.3},
], ids=lambda s: "-".join(f"{v}" for v in s.values()))
@pytest.mark.parametrize("head_dim", [16, 64])
def test_rope_frequencies_equal_transformers(scaling, head_dim):
    hf = Qwen3MoeConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=8192 * 4,
                        rope_parameters={**scaling, "rope_theta": 150000.0})
    want, want_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf)
    got, scale = rope_frequencies(head_dim, 150000.0, scaling)
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
    assert scale == pytest.approx(want_scale, rel=1e-12)


# ------------------------------------------------------------------------------------------ families


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_config_conversion_round_trips(name):
    hf_cfg = HF_CONFIGS[name]()
    cfg = model_config_from_hf(hf_cfg)
    assert hf_family(cfg) == FAMILY[name] and cfg.qk_norm == QK_NORM.get(FAMILY[name])
    if name == "qwen3_moe":
        assert [cfg.is_moe_block(i) for i in range(3)] == [True, False, True] and cfg.num_experts == [4, 4]
        assert (cfg.head_dim, cfg.qkv_bias, cfg.out_bias, cfg.moe.renormalize) == (12, True, True, True)
        assert cfg.rope_scaling == YARN
    back = hf_config_from_model(cfg, base=hf_cfg)
    assert back.model_type == FAMILY[name]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads",
                "num_experts", "num_experts_per_tok", "norm_topk_prob", "tie_word_embeddings", "rope_parameters",
                "mlp_only_layers", "decoder_sparse_step", "moe_intermediate_size", "attention_bias",
                "layer_types", "sliding_window", "swiglu_limit", "swiglu_alpha", "num_local_experts",
                "first_k_dense_replace", "n_shared_experts", "routed_scaling_factor", "n_group", "topk_group",
                "topk_method", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "rope_interleave"):
        assert getattr(back, key, None) == getattr(hf_cfg, key, None), key
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    assert (getattr(back, "head_dim", None) or back.hidden_size // back.num_attention_heads) == head_dim


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_teacher_matches_transformers_logits_and_cached_generation(name, checkpoints):
    hf = reference(checkpoints[name])
    teacher = HFTeacher(checkpoints[name])
    ours = teacher.as_gpt()
    assert hf_family(teacher.architecture()) == FAMILY[name]
    idx = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        want = hf(idx).logits
        assert (want - hf(idx.flip(1)).logits.flip(1)).abs().max() > 1e-3  # positions matter (RoPE)
        torch.testing.assert_close(ours(idx).logits, want, atol=1e-5, rtol=0)
        # cached decoding: each step's logits equal transformers' over the whole sequence, and the tokens
        # equal transformers' own cached greedy generation
        out, step_logits = ours.generate(idx[:, :8], max_new_tokens=8, greedy=True, return_logits=True)
        torch.testing.assert_close(step_logits, hf(out).logits[:, 7:-1], atol=1e-5, rtol=0)
        assert torch.equal(out, hf.generate(idx[:, :8], max_new_tokens=8, do_sample=False))
    # the sharded teacher's file views (per-expert tensors in the files) give the same weights
    lazy = teacher.sharded_tensors()
    for key, value in ours.state_dict().items():
        assert torch.equal(lazy[key].read(full_index(value.shape)), value), key


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_student_from_all_teacher_layers_reproduces_teacher(name, checkpoints):
    hf = reference(checkpoints[name])
    teacher_cfg = model_config_from_hf(hf.config)
    s = StudentConfig(n_layers=teacher_cfg.n_layers, init="teacher")
    student = GPT(derive_student(teacher_cfg, s, vocab_size=VOCAB)).eval()
    idx = random_ids(VOCAB)
    with torch.no_grad():
        want = hf(idx).logits[..., :VOCAB]
        assert (student(idx).logits - want).abs().max() > 1e-2  # a fresh student is far off
        init_student_from_teacher(student, HFTeacher(checkpoints[name]).student_init_model(student.cfg), s)
        torch.testing.assert_close(student(idx).logits, want, atol=1e-5, rtol=0)


def test_student_with_fewer_experts_takes_the_first_experts_with_their_biases(checkpoints):
    hf = reference(checkpoints["gpt_oss"])
    s = StudentConfig(n_layers=3, num_experts=[2, 2, 2], init="teacher")
    student = GPT(derive_student(model_config_from_hf(hf.config), s, vocab_size=VOCAB))
    init_student_from_teacher(student, HFTeacher(checkpoints["gpt_oss"]).student_init_model(student.cfg), s)
    moe, ref = student.blocks[2].ffn, hf.model.layers[2].mlp
    for ours, theirs in [(moe.router.weight, ref.router.weight), (moe.router.bias, ref.router.bias),
                         (moe.experts.w_in, ref.experts.gate_up_proj), (moe.experts.b_in, ref.experts.gate_up_proj_bias),
                         (moe.experts.w_out, ref.experts.down_proj), (moe.experts.b_out, ref.experts.down_proj_bias)]:
        torch.testing.assert_close(ours, theirs[:2], atol=0, rtol=0)
    torch.testing.assert_close(student.blocks[2].attn.sinks, hf.model.layers[2].self_attn.sinks, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_export_reloads_in_transformers_with_equal_logits(name, checkpoints, tmp_path):
    """From the model in memory (`export_hf`), and from a native export (as `python -m students.hf` does:
    its config.json, MLA and rope scaling included, read back)."""
    ours = HFTeacher(checkpoints[name]).as_gpt()
    export_hf(ours, tmp_path / "hf", base=reference(checkpoints[name]).config)
    native = export_model(ours, ours.cfg, tmp_path / "native", meta={"teacher": {"path": str(checkpoints[name])}})
    export_hf_from_native(native, tmp_path / "hf_native")
    idx = random_ids(ours.cfg.vocab_size, seed=1)
    for out in ("hf", "hf_native"):
        hf = reference(tmp_path / out)
        assert hf.config.model_type == FAMILY[name]
        with torch.no_grad():
            torch.testing.assert_close(hf(idx).logits, ours(idx).logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ what is refused


@pytest.mark.parametrize(("make", "words"), [
    (lambda: OlmoeConfig(**TINY, clip_qkv=8.0), ["clip_qkv"]),
    (lambda: Qwen3MoeConfig(**TINY, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     ["dynamic"]),
    (lambda: Qwen3MoeConfig(**TINY, rope_parameters={**YARN, "rope_theta": 1e4, "long_factor": [1.0]}),
     ["long_factor", "yarn"]),
    (lambda: Qwen3MoeConfig(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                     "partial_rotary_factor": 0.5}), ["partial_rotary_factor"]),
    (lambda: OlmoeConfig(**TINY, head_dim=16), ["head_dim"]),
    (lambda: DeepseekV3Config(**DEEPSEEK, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 16}), ["llama3"]),
])
def test_unsupported_features_name_the_key_and_the_feature(make, words, tmp_path):
    make().save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as err:
        HFTeacher(tmp_path).architecture()
    assert err.value.key == "teacher.path" and all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize(("name", "change", "key"), [
    ("gpt_oss", lambda c: replace(c, moe=replace(c.moe, router_bias=False)), "model.moe.router_bias"),
    ("gpt_oss", lambda c: replace(c, qk_norm="head"), "model.qk_norm"),
    ("qwen3_moe", lambda c: replace(c, sliding_window=8), "model.sliding_window"),
    ("qwen3_moe", lambda c: replace(c, moe=replace(c.moe, routed_scaling_factor=2.0)), "model.moe.routed_scaling_factor"),
    ("olmoe", lambda c: replace(c, dense_layers=[0], num_experts=[4]), "model.dense_layers"),
    ("deepseek_v3", lambda c: replace(c, dense_layers=[1], num_experts=[8, 8]), "model.dense_layers"),
    ("deepseek_v3", lambda c: replace(c, moe=replace(c.moe, aux_free_bias=False)), "model.moe.aux_free_bias"),
    ("deepseek_v2", lambda c: replace(c, moe=replace(c.moe, renormalize=True)), "model.moe.renormalize"),
])
def test_students_without_a_family_name_the_key(name, change, key):
    cfg = change(model_config_from_hf(HF_CONFIGS[name]())).validate()
    with pytest.raises(ConfigError) as err:
        hf_family(cfg)
    assert err.value.key == key, str(err.value)


def test_model_options_are_checked_and_dense_layers_shape_the_model():
    base = dict(name="t", vocab_size=32, d_model=16, n_layers=4, n_heads=2, max_seq_len=16, moe_every=1)
    cfg = ModelConfig(**base, dense_layers=[0, 3, 9], num_experts=[2, 2]).validate()  # 9: past the last block
    assert [b.is_moe for b in GPT(cfg).blocks] == [False, True, True, False]
    for key, value in [("rope_scaling", {"rope_type": "longrope"}), ("rope_scaling", {"rope_type": "linear"}),
                       ("qk_norm", "per_token"), ("sliding_window", 0), ("dense_layers", [-1])]:
        with pytest.raises(ConfigError) as err:
            ModelConfig(**base, num_experts=[2] * 4, norm="rmsnorm", **{key: value}).validate()
        assert err.value.key == f"model.{key}"


# ------------------------------------------------------------------------------------------ GPT-OSS attention


def gpt_oss_attention_pair(tmp_path: Path) -> tuple[torch.nn.Module, GPT]:
    """A tiny random GPT-OSS with every MoE layer's output forced to zero, and our GPT with the same
    embeddings, norms, attention (q/k/v/o biases, sinks, YaRN, sliding / full layers) and zero FFNs."""
    from transformers import GptOssConfig

    from distill.interop.hf_config import rope_scaling_from_hf
    from distill.interop.hf_weights import fuse, weight_rules

    hf_cfg = GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=64,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 16, "rope_theta": 1000.0},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    build_checkpoint(hf_cfg, tmp_path / "gpt_oss")
    hf = reference(tmp_path / "gpt_oss")
    for layer in hf.model.layers:
        layer.mlp.forward = lambda h: (torch.zeros_like(h), None)
    theta, scaling = rope_scaling_from_hf(hf.config, "teacher.path")
    cfg = ModelConfig(
        name="gpt_oss_attention", vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_size=12,
        d_ff=8, max_seq_len=64, rope_theta=theta, rope_scaling=scaling, bias=False, attn_bias=True,
        attn_out_bias=True, norm="rmsnorm", norm_eps=hf_cfg.rms_norm_eps, mlp_activation="swiglu",
        tie_embeddings=False, moe_every=0, sliding_window=5, sliding_layers=[0, 2], attn_sinks=True,
    ).validate()
    ours = GPT(cfg).eval()
    hf_state = hf.state_dict()
    state = {k: fuse(how, [hf_state[t] for t in theirs], cfg)
             for k, theirs, how in weight_rules(cfg) if ".ffn." not in k}
    missing = ours.load_state_dict(state, strict=False).missing_keys
    assert sorted(missing) == sorted(k for k in ours.state_dict() if ".ffn." in k)
    with torch.no_grad():
        for block in ours.blocks:
            block.ffn.c_proj.weight.zero_()
    return hf, ours


def test_gpt_oss_attention_sinks_sliding_windows_and_biases_match_transformers(tmp_path):
    hf, ours = gpt_oss_attention_pair(tmp_path)
    assert [b.attn.window for b in ours.blocks] == [5, None, 5]
    idx = random_ids(VOCAB, shape=(2, 24))
    with torch.no_grad():
        want = hf(idx).logits
        torch.testing.assert_close(ours(idx).logits, want, atol=1e-5, rtol=0)
        out, step_logits = ours.generate(idx[:, :8], max_new_tokens=10, greedy=True, return_logits=True)
        torch.testing.assert_close(step_logits, hf(out).logits[:, 7:-1], atol=1e-5, rtol=0)
        assert torch.equal(out, hf.generate(idx[:, :8], max_new_tokens=10, do_sample=False))
        # each option matters here: without sinks, or without the window, the logits differ
        for block in ours.blocks:
            block.attn.window = None
        assert (ours(idx).logits - want).abs().max() > 1e-3
        for block in ours.blocks:
            block.attn.window, block.attn.sinks = 5 if block.attn.layer_idx != 1 else None, None
        assert (ours(idx).logits - want).abs().max() > 1e-3
