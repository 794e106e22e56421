"""Hugging Face MoE families <-> our ModelConfig: which transformers configs convert, and how.

Supported families, checked against transformers' own modeling code (`modeling_<family>.py`):

- ``mixtral``: RMSNorm (fp32), grouped-query attention without biases, rotate-half RoPE, an MoE of SwiGLU
  experts in every block; router softmax in fp32 -> top-k -> renormalised over the k; dropless; untied head.
- ``qwen2_moe``: as Mixtral plus q/k/v biases, dense SwiGLU blocks where ``(i + 1) % decoder_sparse_step`` or
  ``i in mlp_only_layers`` (our `dense_layers`), ``norm_topk_prob`` (renormalise or not), and a shared SwiGLU
  expert whose output is scaled per token by ``sigmoid(x @ w)``.
- ``qwen3_moe``: as Qwen2-MoE without the shared expert, ``attention_bias`` on q/k/v and the output
  projection, and an RMSNorm of each query and key head before RoPE (`qk_norm="head"`).
- ``olmoe``: as Mixtral with ``norm_topk_prob``, ``attention_bias`` (q/k/v/output), and an RMSNorm over the
  whole query and key projections before RoPE (`qk_norm="full"`); ``clip_qkv`` is refused.
- ``gpt_oss``: attention with q/k/v/o biases and a learned sink logit per head (`attn_sinks`), sliding-window
  layers where ``layer_types`` says ``sliding_attention`` (`sliding_window`, `sliding_layers`), and the MoE
  layer of `distill.moe.families` (biased router, top-k softmax, biased experts with a clamped SwiGLU).
- ``deepseek_v2`` / ``deepseek_v3``: multi-head latent attention, ``first_k_dense_replace`` dense blocks,
  shared experts, group-limited routing (`hf_deepseek`).

Every family but DeepSeek's: ``head_dim`` may differ from hidden_size / heads (our `head_size`, not OLMoE's);
``rope_parameters`` of type default, linear, llama3 or yarn (`distill.models.rope`; others are refused,
naming the field). A sliding window over every layer (Mixtral, Qwen) caps our sequence length at the
window, where it is full causal attention; GPT-OSS's per-layer windows are computed as they are.
"""

from __future__ import annotations

from typing import Any

from distill.errors import ConfigError
from distill.interop.hf_deepseek import (
    DEEPSEEK,
    deepseek_config_from_hf,
    deepseek_family,
    deepseek_hf_config_args,
)
from distill.models import ModelConfig
from distill.models.rope import check_rope_scaling
from distill.moe import MoEConfig
from distill.moe.families import moe_options_from_hf

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", *DEEPSEEK)
QK_NORM = {"qwen3_moe": "head", "olmoe": "full"}


def _require(ok: bool, key: str, problem: str, fix: str | None = None) -> None:
    if not ok:
        raise ConfigError(key, problem, fix)


def rope_scaling_from_hf(hf: Any, key: str) -> tuple[float, dict[str, Any]]:
    """(rope_theta, our `rope_scaling`) of a transformers config; ConfigError(`key`) naming a type or field
    we do not compute."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    theta = float(rope.pop("rope_theta", getattr(hf, "rope_theta", None) or 10000.0))
    partial = rope.pop("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None))
    _require(partial in (None, 1, 1.0), key, f"rope_parameters field 'partial_rotary_factor' = {partial} "
             "(RoPE on part of each head) is not supported.")
    kind = rope.setdefault("rope_type", "default")
    if kind == "yarn" and rope.get("factor") is None and rope.get("original_max_position_embeddings"):
        rope["factor"] = hf.max_position_embeddings / rope["original_max_position_embeddings"]  # transformers' rule
    rope = {k: v for k, v in rope.items() if v is not None and not (k == "type" and v == kind)}  # unset, legacy
    try:
        check_rope_scaling(rope, key)
    except ConfigError as err:
        raise ConfigError(key, f"rope_parameters: {err.problem}", err.fix) from None
    return theta, {} if kind == "default" else rope


def gpt_oss_options(hf: Any, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`model.moe` options, `model` options) of a GPT-OSS config: its MoE layer (`distill.moe.families`),
    attention sinks, and the sliding window on the layers `layer_types` names ``sliding_attention``."""
    types = list(hf.layer_types)
    _require(set(types) <= {"sliding_attention", "full_attention"}, key,
             f"layer_types {sorted(set(types))} are not all sliding_attention / full_attention.")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    extra = dict(attn_sinks=True, sliding_window=hf.sliding_window if sliding else None,
                 sliding_layers=None if not sliding or len(sliding) == len(types) else sliding)
    return moe_options_from_hf(hf), extra


def model_config_from_hf(hf: Any, name: str | None = None, key: str = "teacher.path") -> ModelConfig:
    """Our ModelConfig for a transformers config of a supported family; ConfigError(`key`) otherwise."""
    family = getattr(hf, "model_type", None)
    _require(
        family in FAMILIES, key,
        f"model_type '{family}' cannot become a Mixture-of-Students: supported families are {list(FAMILIES)}.",
        "use a Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS or DeepSeek-V2/V3 checkpoint (see the README section 'Distill a Hugging "
        "Face MoE').",
    )
    if family in DEEPSEEK:
        return deepseek_config_from_hf(hf, name, key)
    _require(hf.hidden_act == "silu", key, f"hidden_act '{hf.hidden_act}' is not SwiGLU's silu.")
    theta, scaling = rope_scaling_from_hf(hf, key)
    n_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    _require(head_dim * n_heads == hf.hidden_size or family != "olmoe", key,
             f"OLMoE with head_dim {head_dim} x {n_heads} heads != hidden_size {hf.hidden_size} is not supported.")
    _require(getattr(hf, "clip_qkv", None) is None, key,
             f"clip_qkv={getattr(hf, 'clip_qkv', None)} (q/k/v clamped) is not supported; only clip_qkv=null.")
    max_len = hf.max_position_embeddings
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
    if window and family != "gpt_oss":  # sequences no longer than the window see exactly full causal attention
        max_len = min(max_len, window)
    top_k = hf.num_experts_per_tok
    attn_bias, out_bias, dense_layers = bool(getattr(hf, "attention_bias", False)), None, []
    moe_extra: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if family == "mixtral":
        num_experts, moe_every, renormalize = hf.num_local_experts, 1, True
    elif family == "olmoe":
        num_experts, moe_every, renormalize, out_bias = hf.num_experts, 1, hf.norm_topk_prob, attn_bias
    elif family == "gpt_oss":
        num_experts, moe_every, renormalize, out_bias = hf.num_local_experts, 1, True, attn_bias
        moe_extra, extra = gpt_oss_options(hf, key)
    else:
        num_experts, renormalize = hf.num_experts, hf.norm_topk_prob
        moe_every = hf.decoder_sparse_step if num_experts > 0 else 0
        dense_layers = sorted(hf.mlp_only_layers or [])
        moe_extra = dict(d_ff=hf.moe_intermediate_size)
        if family == "qwen2_moe":
            attn_bias = hf.qkv_bias
            moe_extra.update(num_shared_experts=1, shared_d_ff=hf.shared_expert_intermediate_size, shared_gate=True)
        else:
            out_bias = attn_bias
    _require(not (renormalize and top_k == 1) or family == "gpt_oss", key,
             "top-1 routing with renormalisation (gate value always 1) is not supported.")
    moe = dict(top_k=top_k, activation="swiglu", score_func="softmax", renormalize=renormalize, dropless=True)
    cfg = ModelConfig(
        name=name or family, vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=n_heads, n_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
        d_ff=hf.intermediate_size, max_seq_len=max_len, rope_theta=theta, rope_scaling=scaling,
        bias=False, attn_bias=attn_bias, attn_out_bias=out_bias, norm="rmsnorm", norm_eps=hf.rms_norm_eps,
        mlp_activation="swiglu", tie_embeddings=bool(hf.tie_word_embeddings), init_std=hf.initializer_range,
        moe_every=moe_every, dense_layers=dense_layers, qk_norm=QK_NORM.get(family),
        head_size=None if head_dim * n_heads == hf.hidden_size else head_dim,
        moe=MoEConfig(**{**moe, **moe_extra}), **extra,
    )
    cfg.num_experts = [num_experts] * cfg.num_moe_layers
    try:
        return cfg.validate()
    except ConfigError as err:
        raise ConfigError(key, f"its config does not convert ({err.key}: {err.problem})") from err


def hf_family(cfg: ModelConfig) -> str:
    """The transformers family that computes exactly what `cfg` computes; ConfigError naming the key if none.
    MLA means DeepSeek (hf_deepseek), attention sinks GPT-OSS; the q/k norm tells Qwen3-MoE ("head") and
    OLMoE ("full") apart; a (gated) shared expert means Qwen2-MoE; else Mixtral."""
    m = cfg.moe
    all_moe = cfg.num_moe_layers == cfg.n_layers
    _require(cfg.norm == "rmsnorm", "model.norm", "Hugging Face MoE families use RMSNorm.")
    _require(not cfg.bias, "model.bias", "Hugging Face MoE families have no MLP or norm biases.")
    _require(cfg.moe_every >= 1 and len(set(cfg.num_experts)) == 1, "model.num_experts",
             f"needs MoE blocks with one expert count, got {cfg.num_experts}.")
    _require(m.activation == "swiglu", "model.moe.activation", "experts must be SwiGLU.")
    _require(all_moe or cfg.mlp_activation == "swiglu", "model.mlp_activation", "dense blocks must be SwiGLU.")
    _require(not m.residual, "model.moe.residual", "a residual (PR-)MoE has no Hugging Face family.")
    _require(m.dropless, "model.moe.dropless", "Hugging Face MoE layers never drop tokens.",
             "train the student with model.moe.dropless=true.")
    if cfg.mla is not None:
        return deepseek_family(cfg)
    _require(m.score_func == "softmax", "model.moe.score_func", "the router must be a softmax (sigmoid: DeepSeek-V3).")
    _require(not m.aux_free_bias, "model.moe.aux_free_bias", "a balancing bias changes the choice of experts.")
    if cfg.attn_sinks:
        return _gpt_oss_family(cfg)
    _require(cfg.sliding_window is None, "model.sliding_window",
             "a sliding window is only exported as GPT-OSS (with attention sinks).")
    for field, off in (("router_bias", False), ("expert_bias", False), ("swiglu_limit", None),
                       ("routed_scaling_factor", 1.0), ("n_group", None)):
        _require(getattr(m, field) == off, f"model.moe.{field}",
                 f"is a GPT-OSS / DeepSeek option; Mixtral / Qwen / OLMoE need {field}={off}.")
    family = {"head": "qwen3_moe", "full": "olmoe"}.get(cfg.qk_norm or "")
    if family is not None:
        _require(not m.num_shared_experts, "model.moe.num_shared_experts", f"{family} has no shared expert.")
        _require(cfg.qkv_bias == cfg.out_bias, "model.attn_out_bias",
                 f"{family}'s attention_bias is on q/k/v and the output projection alike.")
        _require(family != "olmoe" or all_moe, "model.dense_layers", "every OLMoE block is MoE.")
        _require(family != "olmoe" or cfg.head_size in (None, cfg.d_model // cfg.n_heads), "model.head_size",
                 "OLMoE's head size is d_model / n_heads.")
        return family
    _require(not cfg.out_bias, "model.attn_out_bias", "Mixtral / Qwen2-MoE have no output-projection bias.")
    if m.num_shared_experts:
        _require(m.shared_gate, "model.moe.shared_gate", "Qwen2-MoE's shared expert has a sigmoid gate.")
        return "qwen2_moe"
    _require(all_moe, "model.moe_every", "without shared experts (Mixtral) every block is MoE.")
    _require(not cfg.qkv_bias, "model.attn_bias", "Mixtral has no q/k/v bias.")
    _require(m.renormalize and m.top_k > 1, "model.moe.renormalize",
             "Mixtral renormalises the top-k gate values (k > 1).")
    return "mixtral"


def _gpt_oss_family(cfg: ModelConfig) -> str:
    m = cfg.moe
    _require(cfg.num_moe_layers == cfg.n_layers, "model.dense_layers", "every GPT-OSS block is MoE.")
    _require(cfg.qk_norm is None, "model.qk_norm", "GPT-OSS has no q/k norm.")
    _require(cfg.qkv_bias == cfg.out_bias, "model.attn_out_bias",
             "GPT-OSS's attention_bias is on q/k/v and the output projection alike.")
    for field, on in (("router_bias", True), ("expert_bias", True), ("renormalize", True),
                      ("routed_scaling_factor", 1.0), ("n_group", None), ("num_shared_experts", 0)):
        _require(getattr(m, field) == on, f"model.moe.{field}", f"GPT-OSS (attention sinks) needs {field}={on}.")
    _require(m.swiglu_limit is not None, "model.moe.swiglu_limit", "GPT-OSS's experts are a clamped SwiGLU.")
    _require(m.top_k > 1 or m.renormalize_top1, "model.moe.renormalize_top1",
             "GPT-OSS's top-k softmax gives gate 1 at top_k=1.")
    return "gpt_oss"


def hf_config_from_model(cfg: ModelConfig, base: Any = None) -> Any:
    """A transformers config for `cfg`. Fields of `base` (e.g. the teacher's config: token ids) are kept
    unless they describe the architecture."""
    import transformers

    family = hf_family(cfg)
    if family in DEEPSEEK:
        args = deepseek_hf_config_args(cfg, family)
    else:
        args = _args(cfg, family)
    cls = {"mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
           "qwen3_moe": transformers.Qwen3MoeConfig, "olmoe": transformers.OlmoeConfig,
           "gpt_oss": transformers.GptOssConfig, "deepseek_v2": transformers.DeepseekV2Config,
           "deepseek_v3": transformers.DeepseekV3Config}[family]
    kept = {}
    if base is not None and getattr(base, "model_type", None) == family:
        kept = {k: v for k, v in base.to_dict().items()
                if k not in args and k not in ("architectures", "dtype", "transformers_version", "model_type")}
    return cls(**{**kept, **args})


def _args(cfg: ModelConfig, family: str) -> dict[str, Any]:
    """The architecture fields of a transformers config of `family` (not DeepSeek) for `cfg`."""
    expert_ff = cfg.moe.d_ff or cfg.ffn_dim
    args: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
        rope_parameters={"rope_type": "default", **cfg.rope_scaling, "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, num_experts_per_tok=cfg.moe.top_k, attention_dropout=0.0,
    )
    renormalize = cfg.moe.renormalize and cfg.moe.top_k > 1
    dense = sorted(i for i in set(cfg.dense_layers) if i < cfg.n_layers)
    if family == "gpt_oss":
        args.update(intermediate_size=expert_ff, num_local_experts=cfg.num_experts[0], head_dim=cfg.head_dim,
                    attention_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window or 128,
                    layer_types=[("sliding" if cfg.attn_window(i) else "full") + "_attention" for i in range(cfg.n_layers)],
                    swiglu_limit=cfg.moe.swiglu_limit, swiglu_alpha=cfg.moe.swiglu_alpha)
    elif family == "mixtral":
        args.update(intermediate_size=expert_ff, num_local_experts=cfg.num_experts[0], sliding_window=None,
                    router_jitter_noise=0.0, head_dim=cfg.head_dim)
    elif family == "olmoe":
        args.update(intermediate_size=expert_ff, num_experts=cfg.num_experts[0], norm_topk_prob=renormalize,
                    attention_bias=cfg.qkv_bias, clip_qkv=None)
    else:
        args.update(intermediate_size=cfg.ffn_dim, moe_intermediate_size=expert_ff, num_experts=cfg.num_experts[0],
                    decoder_sparse_step=cfg.moe_every, mlp_only_layers=dense, norm_topk_prob=renormalize,
                    use_sliding_window=False, head_dim=cfg.head_dim)
        if family == "qwen2_moe":
            args.update(shared_expert_intermediate_size=cfg.moe.shared_d_ff or cfg.moe.num_shared_experts * expert_ff,
                        qkv_bias=cfg.qkv_bias, layer_types=None)
        else:
            args.update(attention_bias=cfg.qkv_bias)
    return args
