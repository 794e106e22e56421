"""Hugging Face MoE families <-> our GPT: configs, weights (both ways) and `save_pretrained` export.

Supported families, checked against transformers' own modeling code (`modeling_mixtral.py`,
`modeling_qwen2_moe.py`):

- ``mixtral``: RMSNorm (fp32), grouped-query attention without biases, rotate-half RoPE, an MoE of SwiGLU
  experts in every block; router softmax in fp32 -> top-k -> renormalised over the k; dropless; untied head.
- ``qwen2_moe``: as Mixtral plus q/k/v biases, dense SwiGLU blocks where ``(i + 1) % decoder_sparse_step``,
  ``norm_topk_prob`` (renormalise or not), and a shared SwiGLU expert whose output is scaled per token by
  ``sigmoid(x @ w)``.

Weights convert from and to the in-memory layout of the transformers modules (stacked experts
``gate_up_proj`` [E, 2f, d] = [gate | up] and ``down_proj`` [E, d, f]); transformers itself reads and
writes the hub's file layout. One table of rules (`weight_rules`) drives both directions.

    python -m students.hf <export dir of a distilled student> <output dir>   # -> save_pretrained dir
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from distill.errors import ConfigError
from distill.models import GPT, ModelConfig
from distill.moe import MoEConfig

FAMILIES = ("mixtral", "qwen2_moe")

# (our key, the transformers keys it is made of, how): "copy"; "cat" = concatenated along dim 0 (fused
# q/k/v, SwiGLU [gate | up]); "t" = dims 1 and 2 swapped (stacked experts); "rows" = may keep only the
# first rows of the transformers tensor (vocabulary padding, experts a student does not keep).
Rule = tuple[str, tuple[str, ...], str]


def _require(ok: bool, key: str, problem: str, fix: str | None = None) -> None:
    if not ok:
        raise ConfigError(key, problem, fix)


# ----------------------------------------------------------------------------------------------------
# configs


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


# ----------------------------------------------------------------------------------------------------
# weights


def weight_rules(cfg: ModelConfig) -> list[Rule]:
    """How each of our parameters is made of the transformers model's parameters (a supported family)."""
    rules: list[Rule] = [
        ("wte.weight", ("model.embed_tokens.weight",), "rows"),
        ("ln_f.weight", ("model.norm.weight",), "copy"),
        ("lm_head.weight", ("lm_head.weight",), "rows"),
    ]
    for i in range(cfg.n_layers):
        o, h = f"blocks.{i}.", f"model.layers.{i}."
        att, mlp = h + "self_attn.", h + "mlp."
        rules += [
            (o + "ln_1.weight", (h + "input_layernorm.weight",), "copy"),
            (o + "ln_2.weight", (h + "post_attention_layernorm.weight",), "copy"),
            (o + "attn.c_attn.weight", tuple(f"{att}{p}_proj.weight" for p in "qkv"), "cat"),
            (o + "attn.c_proj.weight", (att + "o_proj.weight",), "copy"),
        ]
        if cfg.qkv_bias:
            rules.append((o + "attn.c_attn.bias", tuple(f"{att}{p}_proj.bias" for p in "qkv"), "cat"))
        if not cfg.is_moe_block(i):
            rules += [
                (o + "ffn.c_fc.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight"), "cat"),
                (o + "ffn.c_proj.weight", (mlp + "down_proj.weight",), "copy"),
            ]
            continue
        rules += [
            (o + "ffn.router.weight", (mlp + "gate.weight",), "rows"),
            (o + "ffn.experts.w_in", (mlp + "experts.gate_up_proj",), "t"),
            (o + "ffn.experts.w_out", (mlp + "experts.down_proj",), "t"),
        ]
        if cfg.moe.num_shared_experts:
            sh = mlp + "shared_expert."
            rules += [
                (o + "ffn.shared_mlp.w_in.weight", (sh + "gate_proj.weight", sh + "up_proj.weight"), "cat"),
                (o + "ffn.shared_mlp.w_out.weight", (sh + "down_proj.weight",), "copy"),
                (o + "ffn.shared_gate.weight", (mlp + "shared_expert_gate.weight",), "copy"),
            ]
    return rules


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig,
                  targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (shaped like `targets`) from a transformers state dict. Vocabulary rows and experts
    (router rows, stacked expert weights) beyond the targets' are dropped; any other difference, or a
    transformers weight no rule uses, is an error."""
    out, used = {}, set()
    for ours, theirs, how in weight_rules(cfg):
        missing = [k for k in theirs if k not in hf_state]
        if missing:
            raise ConfigError("teacher.path", f"the checkpoint lacks {missing[0]} (an unexpected layout).")
        used.update(theirs)
        parts = [hf_state[k] for k in theirs]
        value = torch.cat(parts) if how == "cat" else parts[0].transpose(1, 2) if how == "t" else parts[0]
        want = targets[ours].shape
        if how in ("rows", "t") and value.shape[1:] == want[1:] and value.shape[0] >= want[0]:
            value = value[: want[0]]
        if value.shape != want:
            raise ConfigError("teacher.path", f"its {theirs[0]} of shape {tuple(parts[0].shape)} does not "
                              f"fit our `{ours}` of shape {tuple(want)}.")
        out[ours] = value
    unused = sorted(set(hf_state) - used)
    if unused:
        raise ConfigError("teacher.path", f"the checkpoint has weights our model has no place for: {unused[:3]}.")
    return out


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig,
                targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers state dict (shaped like `targets`) from ours: the inverse of `state_from_hf`."""
    out = {}
    for ours, theirs, how in weight_rules(cfg):
        value = state[ours]
        if how == "cat":
            parts = value.split([targets[k].shape[0] for k in theirs])
        else:
            parts = (value.transpose(1, 2) if how == "t" else value,)
        out.update({k: p.contiguous() for k, p in zip(theirs, parts)})
    return out


def gpt_from_hf(hf_model: torch.nn.Module, cfg: ModelConfig | None = None) -> GPT:
    """Our GPT computing what the transformers model computes (`cfg` defaults to its converted config; a
    `cfg` with a smaller vocabulary or fewer experts per layer keeps the first rows / experts)."""
    cfg = cfg or model_config_from_hf(hf_model.config)
    dtype = next(hf_model.parameters()).dtype
    model = GPT(cfg).to(dtype)
    model.load_state_dict(state_from_hf(hf_model.state_dict(), cfg, model.state_dict()))
    return model.eval()


def teacher_gpt_for_student(hf_model: torch.nn.Module, student: ModelConfig) -> GPT:
    """The teacher as our GPT, shaped so that `students.mos.init_student_from_teacher` can copy its blocks
    into `student`: the student's vocabulary and, when every student MoE layer has the same smaller
    expert count k, the first k experts of each teacher MoE layer."""
    teacher = model_config_from_hf(hf_model.config)
    counts = set(student.num_experts)
    if len(counts) == 1 and teacher.num_experts and min(counts) < min(teacher.num_experts):
        teacher = replace(teacher, num_experts=[counts.pop()] * teacher.num_moe_layers)
    return gpt_from_hf(hf_model, replace(teacher, vocab_size=student.vocab_size))


def hf_from_gpt(model: GPT, base: Any = None) -> torch.nn.Module:
    """A transformers model computing what `model` computes (see `hf_family` for what can convert)."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_config(hf_config_from_model(model.cfg, base))
    hf_model.to(next(model.parameters()).dtype)
    hf_model.load_state_dict(state_to_hf(model.state_dict(), model.cfg, hf_model.state_dict()), strict=True)
    return hf_model.eval()


# ----------------------------------------------------------------------------------------------------
# export


def export_hf(model: GPT, out_dir: str | Path, base: Any = None, tokenizer: str | Path | Any = None) -> Path:
    """Write `model` as a transformers `save_pretrained` directory (loads with AutoModelForCausalLM).

    `base`: a transformers config whose non-architecture fields (token ids) to keep. `tokenizer`: a
    Hugging Face tokenizer directory, a tokenizer.json, or a `tokenizers.Tokenizer`; saved alongside.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = Path(out_dir)
    hf_from_gpt(model, base).save_pretrained(out)
    if tokenizer is None:
        return out
    path = Path(tokenizer) if isinstance(tokenizer, (str, Path)) else None
    if path is not None and path.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    elif path is not None:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    tok.save_pretrained(out)
    return out


def export_hf_from_native(export_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert an export directory of this project (e.g. a distilled student) to a `save_pretrained` one.
    When it was distilled from a Hugging Face teacher that still exists, the teacher's config (token ids)
    and tokenizer files are reused; otherwise the export's tokenizer.json is wrapped."""
    from transformers import AutoConfig

    from distill.export import CONFIG, TOKENIZER, load_exported

    src = Path(export_dir).expanduser()
    model, _ = load_exported(src, key="export_dir")
    teacher = (json.loads((src / CONFIG).read_text()).get("meta") or {}).get("teacher") or {}
    teacher_dir = Path(teacher["path"]) if teacher.get("path") else None
    base, tokenizer = None, src / TOKENIZER if (src / TOKENIZER).is_file() else None
    if teacher_dir is not None and (teacher_dir / "config.json").is_file():
        base = AutoConfig.from_pretrained(str(teacher_dir), local_files_only=True)
        if (teacher_dir / "tokenizer_config.json").is_file():
            tokenizer = teacher_dir
    return export_hf(model, out_dir, base=base, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", help="an export directory written by distill.distill / distill.pretrain")
    parser.add_argument("out_dir", help="where to write the save_pretrained directory")
    args = parser.parse_args(argv)
    from distill.errors import exit_on_config_error

    out = exit_on_config_error(export_hf_from_native)(args.export_dir, args.out_dir)
    print(f"[students.hf] {args.export_dir} -> {out} (loads with transformers.AutoModelForCausalLM)")


if __name__ == "__main__":
    main()
