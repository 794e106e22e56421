"""Our models as transformers `save_pretrained` directories (load with AutoModelForCausalLM).

The weights stream, one of our tensors at a time: it is gathered (a DTensor of a model laid out by
`distill.parallel.parallelize`) or read (`safe_open` on a native export), turned into its transformers
tensors by the rules of `hf_weights.weight_rules`, put back in the hub's file layout by transformers' own
`revert_weight_conversion` (per-expert weights for Mixtral, Qwen, OLMoE, DeepSeek), and written.
transformers only writes the config files, from a model built on the meta device; no full model is ever
materialised.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from distill.interop.hf_config import hf_config_from_model
from distill.interop.hf_weights import Rule, unfuse, weight_rules
from distill.models import GPT, ModelConfig
from distill.safetensors_stream import Entry, is_writer_rank, write_gathered

HF_WEIGHTS = "model.safetensors"


class _HFPlan:
    """The transformers model of `cfg` on the meta device and, per rule, the hub-layout tensors it writes."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, base: Any = None):
        from transformers import AutoModelForCausalLM
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        self.cfg, self.dtype, self._revert = cfg, dtype, revert_weight_conversion
        with torch.device("meta"):
            self.hf = AutoModelForCausalLM.from_config(hf_config_from_model(cfg, base)).to(dtype)
            ours = GPT(cfg).state_dict()
        self.targets = self.hf.state_dict()
        covered = {k for _, theirs, _ in weight_rules(cfg) for k in theirs}
        if covered != set(self.targets):
            raise RuntimeError(f"our weights and transformers' {type(self.hf).__name__} differ: "
                               f"{sorted(covered ^ set(self.targets))[:3]}")
        self.kept = set(remove_tied_weights_from_state_dict(dict(self.targets), self.hf))  # a tied head once
        self.rules = [r for r in weight_rules(cfg) if any(k in self.kept for k in r[1])]
        self.entries: list[Entry] = []
        for rule in self.rules:
            meta = torch.empty(ours[rule[0]].shape, dtype=dtype, device="meta")
            self.entries += [(n, tuple(t.shape), t.dtype) for n, t in self.convert(rule, meta)]
        whole = self._revert(self.hf, {k: v for k, v in self.targets.items() if k in self.kept})
        if sorted((n, tuple(t.shape), t.dtype) for n, t in whole.items()) != sorted(self.entries):
            raise RuntimeError("transformers' file layout of this model does not follow from our tensors one "
                               "at a time; the streaming Hugging Face export cannot write it.")

    def convert(self, rule: Rule, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Our tensor `value` of `rule` as (name, tensor) in the hub's file layout (`state_to_hf`, one rule)."""
        _, theirs, how = rule
        parts = unfuse(how, value.to(self.dtype), self.cfg)
        hf = {k: p for k, p in zip(theirs, parts) if k in self.kept}
        for k, p in hf.items():
            if p.shape != self.targets[k].shape:
                raise ValueError(f"{rule[0]} gives {k} of shape {tuple(p.shape)}, "
                                 f"transformers expects {tuple(self.targets[k].shape)}")
        return list(self._revert(self.hf, hf).items())

    def write(self, out: Path, get: Callable[[str], torch.Tensor], write: bool) -> None:
        """The weights file in `out`: `get(our name)` per rule, in order (a DTensor is gathered)."""
        def sources() -> Iterator[tuple[torch.Tensor, Callable]]:
            for rule in self.rules:
                yield get(rule[0]), (lambda t, r=rule: self.convert(r, t))

        if not write:
            write_gathered(os.devnull, self.entries, sources(), write=False)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{HF_WEIGHTS}.tmp-", dir=out)
        os.close(fd)
        try:
            write_gathered(tmp, self.entries, sources(), metadata={"format": "pt"})
            os.replace(tmp, out / HF_WEIGHTS)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def save_config(self, out: Path) -> None:
        """config.json and generation_config.json, written by transformers itself (no weights)."""
        self.hf.save_pretrained(out, state_dict={})


def _save_tokenizer(tokenizer: str | Path | Any, out: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(tokenizer) if isinstance(tokenizer, (str, Path)) else None
    if path is not None and path.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    elif path is not None:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    tok.save_pretrained(out)


def _export(cfg: ModelConfig, dtype: torch.dtype, get: Callable[[str], torch.Tensor], out_dir: str | Path,
            base: Any, tokenizer: Any, write: bool) -> Path:
    out = Path(out_dir)
    plan = _HFPlan(cfg, dtype, base)
    if write:
        out.mkdir(parents=True, exist_ok=True)
        plan.save_config(out)
    plan.write(out, get, write)
    if write and tokenizer is not None:
        _save_tokenizer(tokenizer, out)
    return out


def export_hf(model: GPT, out_dir: str | Path, base: Any = None, tokenizer: str | Path | Any = None,
              *, writer: bool | None = None) -> Path:
    """Write `model` as a transformers `save_pretrained` directory (loads with AutoModelForCausalLM).

    `base`: a transformers config whose non-architecture fields (token ids) to keep. `tokenizer`: a
    Hugging Face tokenizer directory, a tokenizer.json, or a `tokenizers.Tokenizer`; saved alongside.
    A model laid out by `distill.parallel.parallelize`: EVERY rank calls this (its tensors are gathered
    one at a time); only `writer` (default: rank 0 when torch.distributed is initialised) writes.
    """
    state = model.state_dict()
    dtype = next(iter(model.parameters())).dtype
    write = is_writer_rank() if writer is None else writer
    return _export(model.cfg, dtype, state.__getitem__, out_dir, base, tokenizer, write)


def export_hf_from_native(export_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert an export directory of this project (e.g. a distilled student) to a `save_pretrained` one,
    reading its weights one tensor at a time (`safe_open`), in the dtype `load_exported` gives them.
    When it was distilled from a Hugging Face teacher that still exists, the teacher's config (token ids)
    and tokenizer files are reused; otherwise the export's tokenizer.json is wrapped."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from distill.export import CONFIG, TOKENIZER, WEIGHTS, read_export_config

    src = Path(export_dir).expanduser()
    cfg = read_export_config(src, key="export_dir")
    teacher = (json.loads((src / CONFIG).read_text()).get("meta") or {}).get("teacher") or {}
    teacher_dir = Path(teacher["path"]) if teacher.get("path") else None
    base, tokenizer = None, src / TOKENIZER if (src / TOKENIZER).is_file() else None
    if teacher_dir is not None and (teacher_dir / "config.json").is_file():
        base = AutoConfig.from_pretrained(str(teacher_dir), local_files_only=True)
        if (teacher_dir / "tokenizer_config.json").is_file():
            tokenizer = teacher_dir
    with safe_open(str(src / WEIGHTS), "pt", backend="pread") as f:  # reads, no mmap
        aliases = f.metadata() or {}  # save_model's {dropped name: kept name} of a tied head
        names = set(f.keys())

        def get(name: str) -> torch.Tensor:
            return f.get_tensor(name if name in names else aliases.get(name, name))

        # load_exported loads into GPT(cfg), whose parameters have the default dtype
        return _export(cfg, torch.get_default_dtype(), get, out_dir, base, tokenizer, write=True)
