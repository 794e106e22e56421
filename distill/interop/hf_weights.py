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
from distill.models import GPT, ModelConfig

# (our key, the transformers keys it is made of, how): "copy"; "cat" = concatenated along dim 0 (fused
# q/k/v, SwiGLU [gate | up]); "t" = dims 1 and 2 swapped (stacked experts); "rows" = may keep only the
# first rows of the transformers tensor (vocabulary padding, experts a student does not keep).
Rule = tuple[str, tuple[str, ...], str]

if TYPE_CHECKING:
    from distill.parallel.load import LazyTensor, SafetensorsFiles

# the files' per-expert names of the stacked in-memory expert tensors (Mixtral's, then Qwen2-MoE's)
EXPERT_FILE_NAMES = {"gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")), "down_proj": (("w2",), ("down_proj",))}


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
    from distill.parallel.load import Cat, Transposed

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
        value = Cat(parts) if how == "cat" else Transposed(parts[0], 1, 2) if how == "t" else parts[0]
        want, got = targets[ours], tuple(value.shape)
        fits = got == want or (how in ("rows", "t") and got[1:] == want[1:] and got[0] >= want[0])
        if not fits:
            raise ConfigError(key, f"its {theirs[0]} (as {got}) does not fit our `{ours}` of shape {want}.")
        out[ours] = value
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    unused = sorted(set(files.keys()) - used)
    if unused:
        raise ConfigError(key, f"the checkpoint has weights our model has no place for: {unused[:3]}.")
    return out
