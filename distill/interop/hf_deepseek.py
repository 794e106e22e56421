"""DeepSeek-V2 / V3 <-> our ModelConfig and weight rules, checked against transformers' `modeling_deepseek_v2.py`
and `modeling_deepseek_v3.py`.

A DeepSeek model is our GPT with `model.mla` (multi-head latent attention, `distill.models.mla`, its own
RoPE: default or YaRN, interleaved or rotate-half pairs), dense SwiGLU blocks before
``first_k_dense_replace`` (`model.dense_layers` = 0 .. k-1) and MoE blocks after, whose layer is
`distill.moe.families`' (ungated shared experts; V2: softmax router, optionally group-limited by the best
expert of a group, never renormalised; V3: sigmoid router choosing with `e_score_correction_bias` (our
`router.balance_bias`), groups scored by their best two, `norm_topk_prob`; both: `routed_scaling_factor`).
"""

from __future__ import annotations

from typing import Any

from distill.errors import ConfigError
from distill.models import ModelConfig
from distill.models.mla import MLAConfig
from distill.moe import MoEConfig
from distill.moe.families import moe_options_from_hf, moe_weight_rules

DEEPSEEK = ("deepseek_v2", "deepseek_v3")
Rule = tuple[str, tuple[str, ...], str]  # as `hf_weights.Rule`


def _require(ok: bool, key: str, problem: str, fix: str | None = None) -> None:
    if not ok:
        raise ConfigError(key, problem, fix)


def deepseek_config_from_hf(hf: Any, name: str | None, key: str) -> ModelConfig:
    """Our ModelConfig of a DeepseekV2Config / DeepseekV3Config; ConfigError(`key`) naming what does not convert."""
    _require(hf.hidden_act == "silu", key, f"hidden_act '{hf.hidden_act}' is not SwiGLU's silu.")
    try:
        mla, moe = MLAConfig.from_hf(hf), moe_options_from_hf(hf)
    except ConfigError as err:
        raise ConfigError(key, f"{err.key}: {err.problem}", err.fix) from None
    _require(moe.get("num_shared_experts", 0) >= 1, key, "a DeepSeek MoE without shared experts is not supported.")
    cfg = ModelConfig(
        name=name or hf.model_type, vocab_size=hf.vocab_size, d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads, d_ff=hf.intermediate_size,
        max_seq_len=hf.max_position_embeddings, bias=False, norm="rmsnorm", norm_eps=hf.rms_norm_eps,
        mlp_activation="swiglu", tie_embeddings=bool(hf.tie_word_embeddings), init_std=hf.initializer_range,
        moe_every=1, dense_layers=list(range(hf.first_k_dense_replace or 0)), mla=mla, moe=MoEConfig(**moe),
    )
    cfg.num_experts = [hf.n_routed_experts] * cfg.num_moe_layers
    try:
        return cfg.validate()
    except ConfigError as err:
        raise ConfigError(key, f"its config does not convert ({err.key}: {err.problem})") from err


def deepseek_family(cfg: ModelConfig) -> str:
    """deepseek_v3 (sigmoid router) or deepseek_v2 (softmax) for a `cfg` with `model.mla`; ConfigError naming
    the key that keeps it from being either."""
    m, mla = cfg.moe, cfg.mla
    first_k = sum(not cfg.is_moe_block(i) for i in range(cfg.n_layers))
    _require(all(not cfg.is_moe_block(i) for i in range(first_k)) and first_k < cfg.n_layers, "model.dense_layers",
             "DeepSeek's dense blocks are the first first_k_dense_replace ones, then every block is MoE.")
    _require(m.num_shared_experts >= 1 and not m.shared_gate, "model.moe.num_shared_experts",
             "DeepSeek's MoE layers have ungated shared experts.")
    _require(m.shared_d_ff in (None, m.num_shared_experts * (m.d_ff or cfg.ffn_dim)), "model.moe.shared_d_ff",
             "DeepSeek's shared experts are n_shared_experts x moe_intermediate_size wide.")
    for field, off in (("router_bias", False), ("expert_bias", False), ("swiglu_limit", None)):
        _require(getattr(m, field) == off, f"model.moe.{field}", f"is a GPT-OSS option; DeepSeek needs {field}={off}.")
    family = "deepseek_v3" if m.score_func == "sigmoid" else "deepseek_v2"
    if family == "deepseek_v3":
        _require(m.aux_free_bias, "model.moe.aux_free_bias", "DeepSeek-V3 chooses with e_score_correction_bias.")
        _require(m.renormalize == m.renormalize_top1 or m.top_k > 1, "model.moe.renormalize_top1",
                 "DeepSeek-V3's norm_topk_prob renormalises at top_k=1 too.")
        _require(m.n_group is None or m.group_score == "top2_sum", "model.moe.group_score", "V3 sums a group's best two.")
    else:
        _require(not m.aux_free_bias, "model.moe.aux_free_bias", "DeepSeek-V2 has no choice bias.")
        _require(not m.renormalize, "model.moe.renormalize", "DeepSeek-V2 never renormalises the gate values.")
        _require(m.n_group is None or m.group_score == "max", "model.moe.group_score", "V2 scores a group by its best.")
        _require(mla.rope_interleave, "model.mla.rope_interleave", "DeepSeek-V2 rotates interleaved pairs.")
    return family


def deepseek_hf_config_args(cfg: ModelConfig, family: str) -> dict[str, Any]:
    """The architecture fields of a transformers DeepSeek config for `cfg` (`deepseek_family`)."""
    m, mla = cfg.moe, cfg.mla
    rope: dict[str, Any] = {"rope_type": mla.rope_type, "rope_theta": mla.rope_theta}
    if mla.rope_type == "yarn":
        rope |= dict(factor=mla.rope_factor, original_max_position_embeddings=mla.original_max_position_embeddings,
                     beta_fast=mla.beta_fast, beta_slow=mla.beta_slow)
        rope |= {} if mla.rope_truncate else {"truncate": False}
        rope |= {k: getattr(mla, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                 if getattr(mla, k) is not None}
    args = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, hidden_act="silu",
        intermediate_size=cfg.ffn_dim, moe_intermediate_size=m.d_ff or cfg.ffn_dim, n_routed_experts=cfg.num_experts[0],
        n_shared_experts=m.num_shared_experts, routed_scaling_factor=m.routed_scaling_factor,
        num_experts_per_tok=m.top_k, first_k_dense_replace=cfg.n_layers - cfg.num_moe_layers,
        kv_lora_rank=mla.kv_lora_rank, q_lora_rank=mla.q_lora_rank, qk_rope_head_dim=mla.qk_rope_head_dim,
        qk_nope_head_dim=mla.qk_nope_head_dim, v_head_dim=mla.v_head_dim, attention_bias=mla.attention_bias,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope, attention_dropout=0.0,
        n_group=m.n_group or 1, topk_group=m.topk_group or 1, norm_topk_prob=m.renormalize,
    )
    if family == "deepseek_v3":
        return args | dict(rope_interleave=mla.rope_interleave)
    return args | dict(topk_method="group_limited_greedy" if m.n_group else "greedy", mlp_bias=False)


MLA_NAMES = ("kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight")


def deepseek_block_rules(cfg: ModelConfig, o: str, h: str) -> list[Rule]:
    """The rules of block `o` ("blocks.3.") <- transformers layer `h` ("model.layers.3."): its MLA attention
    (the names are transformers', shapes unchanged) and, in an MoE block, `moe_weight_rules`."""
    mla = cfg.mla
    names = list(MLA_NAMES) + (["q_proj.weight"] if mla.q_lora_rank is None else
                               ["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"])
    if mla.attention_bias:
        names += ["kv_a_proj_with_mqa.bias", "o_proj.bias"] + ([] if mla.q_lora_rank is None else ["q_a_proj.bias"])
    rules: list[Rule] = [(f"{o}attn.{n}", (f"{h}self_attn.{n}",), "copy") for n in names]
    if cfg.is_moe_block(int(o.split(".")[1])):
        family = "deepseek_v3" if cfg.moe.score_func == "sigmoid" else "deepseek_v2"
        rules += moe_weight_rules(o + "ffn.", h + "mlp.", family, cfg.moe)
    return rules
