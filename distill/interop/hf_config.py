"""Hugging Face MoE families <-> our ModelConfig: which transformers configs convert, and how.

Supported families, checked against transformers' own modeling code (`modeling_mixtral.py`,
`modeling_qwen2_moe.py`):

- ``mixtral``: RMSNorm (fp32), grouped-query attention without biases, rotate-half RoPE, an MoE of SwiGLU
  experts in every block; router softmax in fp32 -> top-k -> renormalised over the k; dropless; untied head.
- ``qwen2_moe``: as Mixtral plus q/k/v biases, dense SwiGLU blocks where ``(i + 1) % decoder_sparse_step``,
  ``norm_topk_prob`` (renormalise or not), and a shared SwiGLU expert whose output is scaled per token by
  ``sigmoid(x @ w)``.
"""

from __future__ import annotations

from typing import Any

from distill.errors import ConfigError
from distill.models import ModelConfig
from distill.moe import MoEConfig

FAMILIES = ("mixtral", "qwen2_moe")


def _require(ok: bool, key: str, problem: str, fix: str | None = None) -> None:
    if not ok:
        raise ConfigError(key, problem, fix)


def model_config_from_hf(hf: Any, name: str | None = None, key: str = "teacher.path") -> ModelConfig:
    """Our ModelConfig for a transformers config of a supported family; ConfigError(`key`) otherwise."""
    family = getattr(hf, "model_type", None)
    _require(
        family in FAMILIES, key,
        f"model_type '{family}' cannot become a Mixture-of-Students: supported families are {list(FAMILIES)}.",
        "use a Mixtral or Qwen2-MoE checkpoint (see the README section 'Distill a Hugging Face MoE').",
    )
    _require(hf.hidden_act == "silu", key, f"hidden_act '{hf.hidden_act}' is not SwiGLU's silu.")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    _require(rope.get("rope_type", "default") == "default", key,
             f"RoPE type '{rope.get('rope_type')}' (scaled RoPE) is not supported; only the default one.")
    n_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    _require(head_dim * n_heads == hf.hidden_size, key,
             f"head_dim {head_dim} x {n_heads} heads != hidden_size {hf.hidden_size}; not supported.")
    max_len = hf.max_position_embeddings
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
    if window:  # sequences no longer than the window see exactly full causal attention
        max_len = min(max_len, window)
    top_k = hf.num_experts_per_tok
    if family == "mixtral":
        num_experts, moe_every, renormalize, attn_bias = hf.num_local_experts, 1, True, False
        moe_extra: dict[str, Any] = {}
    else:
        _require(not hf.mlp_only_layers, key,
                 f"mlp_only_layers={list(hf.mlp_only_layers)} is not supported (only decoder_sparse_step).")
        num_experts, renormalize, attn_bias = hf.num_experts, hf.norm_topk_prob, hf.qkv_bias
        moe_every = hf.decoder_sparse_step if num_experts > 0 else 0
        moe_extra = dict(d_ff=hf.moe_intermediate_size, num_shared_experts=1,
                         shared_d_ff=hf.shared_expert_intermediate_size, shared_gate=True)
    _require(not (renormalize and top_k == 1), key,
             "top-1 routing with renormalisation (gate value always 1) is not supported.")
    cfg = ModelConfig(
        name=name or family, vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=n_heads, n_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
        d_ff=hf.intermediate_size, max_seq_len=max_len, rope_theta=float(rope.get("rope_theta", 10000.0)),
        bias=False, attn_bias=attn_bias, norm="rmsnorm", norm_eps=hf.rms_norm_eps, mlp_activation="swiglu",
        tie_embeddings=bool(hf.tie_word_embeddings), init_std=hf.initializer_range, moe_every=moe_every,
        moe=MoEConfig(top_k=top_k, activation="swiglu", score_func="softmax", renormalize=renormalize,
                      dropless=True, **moe_extra),
    )
    cfg.num_experts = [num_experts] * cfg.num_moe_layers
    try:
        return cfg.validate()
    except ConfigError as err:
        raise ConfigError(key, f"its config does not convert ({err.key}: {err.problem})") from err


def hf_family(cfg: ModelConfig) -> str:
    """The transformers family that computes exactly what `cfg` computes; ConfigError naming the key if none."""
    m = cfg.moe
    _require(cfg.norm == "rmsnorm", "model.norm", "Hugging Face MoE families use RMSNorm.")
    _require(not cfg.bias, "model.bias", "Mixtral / Qwen2-MoE have no MLP, output-projection or norm biases.")
    _require(cfg.moe_every >= 1 and len(set(cfg.num_experts)) == 1, "model.num_experts",
             f"needs MoE blocks with one expert count, got {cfg.num_experts}.")
    _require(m.activation == "swiglu", "model.moe.activation", "experts must be SwiGLU.")
    _require(cfg.moe_every == 1 or cfg.mlp_activation == "swiglu", "model.mlp_activation",
             "dense blocks must be SwiGLU.")
    _require(m.score_func == "softmax", "model.moe.score_func", "the router must be a softmax.")
    _require(not m.residual, "model.moe.residual", "a residual (PR-)MoE has no Hugging Face family.")
    _require(m.dropless, "model.moe.dropless", "Hugging Face MoE layers never drop tokens.",
             "train the student with model.moe.dropless=true.")
    _require(not m.aux_free_bias, "model.moe.aux_free_bias", "a balancing bias changes the choice of experts.")
    if m.num_shared_experts:
        _require(m.shared_gate, "model.moe.shared_gate", "Qwen2-MoE's shared expert has a sigmoid gate.")
        return "qwen2_moe"
    _require(cfg.moe_every == 1, "model.moe_every", "without shared experts (Mixtral) every block is MoE.")
    _require(not cfg.qkv_bias, "model.attn_bias", "Mixtral has no q/k/v bias.")
    _require(m.renormalize and m.top_k > 1, "model.moe.renormalize",
             "Mixtral renormalises the top-k gate values (k > 1).")
    return "mixtral"


def hf_config_from_model(cfg: ModelConfig, base: Any = None) -> Any:
    """A transformers config for `cfg`. Fields of `base` (e.g. the teacher's config: token ids) are kept
    unless they describe the architecture."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    family = hf_family(cfg)
    expert_ff = cfg.moe.d_ff or cfg.ffn_dim
    args: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, num_experts_per_tok=cfg.moe.top_k, attention_dropout=0.0,
    )
    if family == "mixtral":
        cls = MixtralConfig
        args.update(intermediate_size=expert_ff, num_local_experts=cfg.num_experts[0], sliding_window=None,
                    router_jitter_noise=0.0, head_dim=cfg.head_dim)
    else:
        cls = Qwen2MoeConfig
        args.update(intermediate_size=cfg.ffn_dim, moe_intermediate_size=expert_ff,
                    shared_expert_intermediate_size=cfg.moe.shared_d_ff or cfg.moe.num_shared_experts * expert_ff,
                    num_experts=cfg.num_experts[0], decoder_sparse_step=cfg.moe_every, mlp_only_layers=[],
                    norm_topk_prob=cfg.moe.renormalize and cfg.moe.top_k > 1, qkv_bias=cfg.qkv_bias,
                    use_sliding_window=False, layer_types=None)
    kept = {}
    if base is not None and getattr(base, "model_type", None) == family:
        kept = {k: v for k, v in base.to_dict().items()
                if k not in args and k not in ("architectures", "dtype", "transformers_version", "model_type")}
    return cls(**{**kept, **args})
