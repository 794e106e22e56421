"""Hugging Face MoE weights <-> our GPT's, both ways, and whole models converted through them.

Weights convert from and to the in-memory layout of the transformers modules (stacked experts
``gate_up_proj`` [E, 2f, d] = [gate | up] and ``down_proj`` [E, d, f]); transformers itself reads and
writes the hub's file layout. One table of rules (`weight_rules`) drives both directions.

`hf_file_tensors` applies the same rules to the files themselves, lazily: a sharded teacher reads each of
its regions straight from the safetensors files, which store experts one by one (``experts.<j>.w1`` /
``gate_proj`` ...; Mixtral under ``block_sparse_moe``) or already stacked.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from distill.errors import ConfigError
from distill.interop.hf_config import hf_config_from_model, model_config_from_hf
from distill.interop.hf_deepseek import deepseek_block_rules
from distill.models import GPT, ModelConfig
from distill.models.fused import GLU_GROUP_SIZES, deinterleave, interleave, qkv_group_sizes
from distill.moe.families import moe_weight_rules

# (our key, the transformers keys it is made of, how): "copy"; "qkv" = q, k, v interleaved by key/value
# head, "glu" = SwiGLU gate and up interleaved by unit (`distill.models.fused`); "t" = dims 1 and 2 swapped
# (stacked experts); "t_glu" = swapped, then its [gate | up] halves interleaved (stacked SwiGLU experts);
# "rows" = may keep only the first rows of the transformers tensor (vocabulary padding, experts a student
# does not keep; also for "t" and "t_glu").
Rule = tuple[str, tuple[str, ...], str]
FIRST_ROWS = ("rows", "t", "t_glu")

if TYPE_CHECKING:
    from distill.parallel.load import LazyTensor, SafetensorsFiles

# the files' per-expert names of the stacked in-memory expert tensors (Mixtral's, then Qwen2/3-MoE's and OLMoE's)
EXPERT_FILE_NAMES = {"gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")), "down_proj": (("w2",), ("down_proj",))}


def _attention_rules(cfg: ModelConfig, o: str, att: str) -> list[Rule]:
    """Our attention of block `o` ("blocks.3.") <- the transformers attention module `att`."""
    rules: list[Rule] = [
        (o + "attn.c_attn.weight", tuple(f"{att}{p}_proj.weight" for p in "qkv"), "qkv"),
        (o + "attn.c_proj.weight", (att + "o_proj.weight",), "copy"),
    ]
    if cfg.qkv_bias:
        rules.append((o + "attn.c_attn.bias", tuple(f"{att}{p}_proj.bias" for p in "qkv"), "qkv"))
    if cfg.out_bias:
        rules.append((o + "attn.c_proj.bias", (att + "o_proj.bias",), "copy"))
    if cfg.qk_norm is not None:
        rules += [(f"{o}attn.{p}_norm.weight", (f"{att}{p}_norm.weight",), "copy") for p in "qk"]
    if cfg.attn_sinks:
        rules.append((o + "attn.sinks", (att + "sinks",), "copy"))
    return rules


def weight_rules(cfg: ModelConfig) -> list[Rule]:
    """How each of our parameters is made of the transformers model's parameters (a supported family)."""
    rules: list[Rule] = [
        ("wte.weight", ("model.embed_tokens.weight",), "rows"),
        ("ln_f.weight", ("model.norm.weight",), "copy"),
        ("lm_head.weight", ("lm_head.weight",), "rows"),
    ]
    for i in range(cfg.n_layers):
        o, h = f"blocks.{i}.", f"model.layers.{i}."
        mlp = h + "mlp."
        rules += [
            (o + "ln_1.weight", (h + "input_layernorm.weight",), "copy"),
            (o + "ln_2.weight", (h + "post_attention_layernorm.weight",), "copy"),
        ]
        if cfg.mla is not None:  # DeepSeek: MLA, and in an MoE block its MoE layer (hf_deepseek)
            rules += deepseek_block_rules(cfg, o, h)
        else:
            rules += _attention_rules(cfg, o, h + "self_attn.")
        if not cfg.is_moe_block(i):
            rules += [
                (o + "ffn.c_fc.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight"), "glu"),
                (o + "ffn.c_proj.weight", (mlp + "down_proj.weight",), "copy"),
            ]
            continue
        if cfg.mla is not None:
            continue
        if cfg.moe.router_bias or cfg.moe.expert_bias:  # GPT-OSS's MoE layer (distill.moe.families)
            rules += moe_weight_rules(o + "ffn.", mlp, "gpt_oss", cfg.moe)
            continue
        rules += [
            (o + "ffn.router.weight", (mlp + "gate.weight",), "rows"),
            (o + "ffn.experts.w_in", (mlp + "experts.gate_up_proj",), "t_glu"),
            (o + "ffn.experts.w_out", (mlp + "experts.down_proj",), "t"),
        ]
        if cfg.moe.num_shared_experts:
            sh = mlp + "shared_expert."
            rules += [
                (o + "ffn.shared_mlp.w_in.weight", (sh + "gate_proj.weight", sh + "up_proj.weight"), "glu"),
                (o + "ffn.shared_mlp.w_out.weight", (sh + "down_proj.weight",), "copy"),
                (o + "ffn.shared_gate.weight", (mlp + "shared_expert_gate.weight",), "copy"),
            ]
    return rules


def fuse(how: str, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Our tensor from the transformers tensors of a rule (see `Rule`)."""
    if how == "qkv":
        return interleave(parts, qkv_group_sizes(cfg))
    if how == "glu":
        return interleave(parts, GLU_GROUP_SIZES)
    if how in ("t", "t_glu"):
        value = parts[0].transpose(1, 2)
        return interleave(value.chunk(2, dim=2), GLU_GROUP_SIZES, 2) if how == "t_glu" else value
    return parts[0]


def unfuse(how: str, value: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """The transformers tensors of a rule from ours: the inverse of `fuse`."""
    if how == "qkv":
        return deinterleave(value, qkv_group_sizes(cfg))
    if how == "glu":
        return deinterleave(value, GLU_GROUP_SIZES)
    if how == "t_glu":
        return [torch.cat(deinterleave(value, GLU_GROUP_SIZES, 2), 2).transpose(1, 2)]
    return [value.transpose(1, 2) if how == "t" else value]


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
        value = fuse(how, parts, cfg)
        want = targets[ours].shape
        if how in FIRST_ROWS and value.shape[1:] == want[1:] and value.shape[0] >= want[0]:
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
        out.update({k: p.contiguous() for k, p in zip(theirs, unfuse(how, state[ours], cfg))})
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


def _file_tensor(key: str, files: SafetensorsFiles, used: set[str]) -> LazyTensor | None:
    """The transformers in-memory tensor `key` as stored in `files`: under its own name, under Mixtral's
    ``block_sparse_moe`` module name, or (stacked experts) as one tensor per expert (fused [gate | up])."""
    from distill.parallel.load import Cat, Stack

    for name in (key, key.replace(".mlp.", ".block_sparse_moe.", 1)):
        if name in files:
            used.add(name)
            return files.tensor(name)
    m = re.fullmatch(r"(.*)\.mlp\.experts\.(gate_up_proj|down_proj)", key)
    for module in ("mlp", "block_sparse_moe") if m else ():
        for names in EXPERT_FILE_NAMES[m[2]]:
            stem = f"{m[1]}.{module}.experts."
            experts, j = [], 0
            while all(f"{stem}{j}.{n}.weight" in files for n in names):
                parts = [f"{stem}{j}.{n}.weight" for n in names]
                used.update(parts)
                experts.append(Cat([files.tensor(k) for k in parts]) if len(parts) > 1 else files.tensor(parts[0]))
                j += 1
            if experts:
                return Stack(experts)
    return None


def hf_file_tensors(cfg: ModelConfig, files: SafetensorsFiles, key: str = "teacher.path") -> dict[str, LazyTensor]:
    """Our GPT's tensors (for `cfg`, converted from the checkpoint's config) as lazy views of a Hugging Face
    checkpoint's safetensors files: `weight_rules` applied region by region, nothing read yet. A missing
    tensor, a shape that does not fit, or a stored tensor no rule uses is a ConfigError naming `key`."""
    from distill.parallel.load import Interleaved, Narrow, Transposed

    with torch.device("meta"):
        targets = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    out: dict[str, LazyTensor] = {}
    used: set[str] = set()
    for ours, theirs, how in weight_rules(cfg):
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            used.add("lm_head.weight")  # some tied checkpoints store the head as well; ours is the embedding
            continue
        parts = []
        for name in theirs:
            part = _file_tensor(name, files, used)
            if part is None:
                raise ConfigError(key, f"the checkpoint's files lack {name} (an unexpected layout).")
            parts.append(part)
        value = parts[0]
        if how in ("qkv", "glu"):
            value = Interleaved(parts, qkv_group_sizes(cfg) if how == "qkv" else GLU_GROUP_SIZES)
        elif how in ("t", "t_glu"):
            value = Transposed(parts[0], 1, 2)
            if how == "t_glu":
                half = value.shape[2] // 2
                value = Interleaved([Narrow(value, 2, 0, half), Narrow(value, 2, half, half)], GLU_GROUP_SIZES, 2)
        want, got = targets[ours], tuple(value.shape)
        fits = got == want or (how in FIRST_ROWS and got[1:] == want[1:] and got[0] >= want[0])
        if not fits:
            raise ConfigError(key, f"its {theirs[0]} (as {got}) does not fit our `{ours}` of shape {want}.")
        out[ours] = value
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    if cfg.mla is not None:  # DeepSeek-V3's multi-token-prediction layers (after the last), as transformers
        used |= {k for k in files.keys() if re.match(rf"model\.layers\.{cfg.n_layers}\.", k)}
    unused = sorted(set(files.keys()) - used)
    if unused:
        raise ConfigError(key, f"the checkpoint has weights our model has no place for: {unused[:3]}.")
    return out
