"""Export any of our models so that `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads it.

`export_anywhere` writes a transformers family (Mixtral, Qwen2-MoE: `distill.interop.export_hf`) when one
computes exactly what the model computes (`hf_family`), and otherwise `export_remote`: a directory with its own
modeling code (`configuration_distill.py`, `modeling_distill.py`, copied verbatim from this package, with
`auto_map` in config.json), loaded with `trust_remote_code=True`, e.g. a residual PR-MoE with a pyramid of
expert counts. Both write the tokenizer beside the weights (`tokenizer.json` + `tokenizer_config.json`, with
its end-of-text token as `eos_token` and `pad_token`), which lm-evaluation-harness and `generate` need.

Written against transformers 5.24 (`save_pretrained` copies the modeling files and writes `auto_map` for
classes registered with `register_for_auto_class`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from distill.atomic import AtomicDir
from distill.errors import ConfigError
from distill.models import GPT, ModelConfig

REMOTE, FAMILY = "remote", "family"
# The ModelConfig / MoEConfig fields modeling_distill.py implements. A field added to those dataclasses later is
# refused (naming its key) unless it keeps its default, until the modeling file learns it.
MODEL_KEYS = {"name", "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "moe_every",
              "num_experts", "moe", "dropout", "rope_theta", "bias", "init_std", "norm", "norm_eps", "n_kv_heads",
              "attn_bias", "mlp_activation", "tie_embeddings", "dense_layers", "head_size", "attn_out_bias"}
MOE_KEYS = {"top_k", "d_ff", "activation", "score_func", "renormalize", "capacity_factor", "eval_capacity_factor",
            "min_capacity", "drop_policy", "dropless", "jitter_eps", "gumbel_noise", "residual", "num_shared_experts",
            "shared_d_ff", "shared_gate", "aux_free_bias", "aux_free_bias_rate", "use_grouped_mm"}
VALUES = {"norm": ("layernorm", "rmsnorm"), "mlp_activation": ("gelu", "swiglu"), "moe.activation": ("gelu", "swiglu"),
          "moe.score_func": ("softmax", "sigmoid"), "moe.drop_policy": ("probs", "position", "random")}


def check_remote_covers(cfg: ModelConfig) -> None:
    """ConfigError naming the first `model.*` key whose value the shipped modeling code does not implement."""
    fix = "export with distill's native format (distill.export.export_model) until modeling_distill.py covers it."
    for obj, known, prefix in ((cfg, MODEL_KEYS, "model."), (cfg.moe, MOE_KEYS, "model.moe.")):
        for f in dataclasses.fields(obj):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name not in known and getattr(obj, f.name) != default:
                raise ConfigError(prefix + f.name, "is not implemented by the shipped modeling code "
                                  "(distill/hf_remote/modeling_distill.py).", fix)
    for key, allowed in VALUES.items():
        value = getattr(cfg.moe, key[4:]) if key.startswith("moe.") else getattr(cfg, key)
        if value not in allowed:
            raise ConfigError(f"model.{key}", f"{value!r} is not implemented by the shipped modeling code.", fix)


def hf_tokenizer(tokenizer: Any, key: str = "tokenizer") -> Any:
    """A `PreTrainedTokenizerFast` (eos = pad = the end-of-text token) from our TextTokenizer, a
    `tokenizers.Tokenizer`, a tokenizer.json file or a directory holding one; ConfigError naming ``key``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from distill.data.tokenizer import KNOWN_EOS_TOKENS

    eos = getattr(tokenizer, "eos_token", None)
    backend = getattr(tokenizer, "backend", tokenizer)
    if isinstance(tokenizer, (str, os.PathLike)):
        file = Path(tokenizer).expanduser()
        file = file / "tokenizer.json" if file.is_dir() else file
        if not file.is_file():
            raise ConfigError(key, f"no tokenizer at '{file}'.", "give the tokenizer.json the model was trained "
                              "with (an export directory of distill.pretrain / distill.distill holds one).")
        backend = Tokenizer.from_file(str(file))
    if not isinstance(backend, Tokenizer):
        raise ConfigError(key, f"no tokenizer given (got {tokenizer!r}): an exported model needs one.",
                          "pass the tokenizer the model was trained with (a tokenizer.json, or the data's tokenizer).")
    vocab = backend.get_vocab(with_added_tokens=True)
    eos = eos or next((t for t in KNOWN_EOS_TOKENS if t in vocab), None)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos)


def _remote_classes() -> tuple[type, type]:
    from distill.hf_remote.configuration_distill import DistillMoEConfig
    from distill.hf_remote.modeling_distill import DistillMoEForCausalLM

    DistillMoEConfig.register_for_auto_class()
    DistillMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    return DistillMoEConfig, DistillMoEForCausalLM


def remote_model(model: GPT, tok: Any = None) -> torch.nn.Module:
    """`model` as the shipped transformers class (the same weights, copied)."""
    check_remote_covers(model.cfg)
    config_cls, model_cls = _remote_classes()
    ids = {f"{k}_token_id": tok.eos_token_id for k in ("eos", "bos", "pad")} if tok is not None else {}
    config = config_cls(distill=dataclasses.asdict(model.cfg), **ids)
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        hf = model_cls(config)
    hf.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()}, strict=True, assign=True)
    if model.cfg.tie_embeddings:
        hf.lm_head.weight = hf.wte.weight
    hf.config.dtype = dtype
    return hf.eval()


def _write(out_dir: str | os.PathLike, write: Any) -> Path:
    """Run ``write(tmp)`` into a temporary sibling of ``out_dir``, then rename it into place."""
    out = Path(out_dir)
    with AtomicDir(out) as tmp:
        write(tmp)
    return out


def _source(model_or_export_dir: GPT | str | os.PathLike, tokenizer: Any) -> tuple[GPT, Any]:
    """The model, and the tokenizer (by default the tokenizer.json of an export directory, when it has one)."""
    if isinstance(model_or_export_dir, GPT):
        return model_or_export_dir, tokenizer
    from distill.export import TOKENIZER, load_exported

    model, _ = load_exported(model_or_export_dir, key="model_or_export_dir")
    file = Path(model_or_export_dir).expanduser() / TOKENIZER
    return model, tokenizer if tokenizer is not None else (file if file.is_file() else None)


def export_remote(model_or_export_dir: GPT | str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Any = None,
                  *, key: str = "tokenizer") -> Path:
    """Write a GPT (or the model of an export directory) with its own modeling code and its tokenizer.

    ``tokenizer``: our TextTokenizer, a `tokenizers.Tokenizer` or a tokenizer.json path (default: the one
    beside an export dir). ConfigError naming ``key`` without one, or naming `model.*` for an option the
    modeling code does not implement."""
    model, tokenizer = _source(model_or_export_dir, tokenizer)
    check_remote_covers(model.cfg)
    tok = hf_tokenizer(tokenizer, key)
    hf = remote_model(model, tok)

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _write(out_dir, write)


def export_anywhere(model_or_export_dir: GPT | str | os.PathLike, out_dir: str | os.PathLike, tokenizer: Any = None,
                    *, key: str = "tokenizer") -> tuple[Path, str]:
    """A transformers family's directory when one matches the model exactly, else `export_remote`'s.
    Returns (the directory, "family" | "remote")."""
    from distill.interop import export_hf, hf_family

    model, tokenizer = _source(model_or_export_dir, tokenizer)
    tok = hf_tokenizer(tokenizer, key)
    try:
        hf_family(model.cfg)
    except ConfigError:
        return export_remote(model, out_dir, tokenizer, key=key), REMOTE

    def write(tmp: Path) -> None:
        export_hf(model, tmp, writer=True)
        tok.save_pretrained(tmp)

    return _write(out_dir, write), FAMILY


__all__ = ["FAMILY", "REMOTE", "check_remote_covers", "export_anywhere", "export_remote",
           "hf_tokenizer", "remote_model"]
