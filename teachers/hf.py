"""Teachers from Hugging Face: a local or hub causal-LM checkpoint run through `transformers`, frozen.

    python -m distill.distill teacher=hf teacher.path=<save_pretrained dir or hub id> ...

The teacher's own tokenizer becomes the data's tokenizer (`use_teacher_tokenizer`); its architecture,
converted to our ModelConfig (students/hf.py), is what the Mixture-of-Students is derived from. The
teacher runs in the dtype the trainer's precision implies (bf16 / fp16 / fp32), in eval mode, with no
gradients; DistillModule calls it under inference mode and trims padding-only vocabulary entries.
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from distill.errors import ConfigError
from distill.export import file_sha256
from distill.models import GPT, ModelConfig
from students.hf import gpt_from_hf, model_config_from_hf, teacher_gpt_for_student

KEY = "teacher.path"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def resolve_hf_path(path: str | os.PathLike, key: str = KEY) -> Path:
    """A local checkpoint directory, or a hub model id resolved to its local snapshot (downloaded once;
    HF_HUB_OFFLINE=1 uses the cache only)."""
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(key, f"'{p}' has no config.json: it is not a Hugging Face checkpoint directory.",
                              "point it at a `save_pretrained` directory or a hub model id.")
        return p.resolve()
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        raise ConfigError(key, f"'{path}' does not exist and is not a hub model id (owner/name).")
    from huggingface_hub import snapshot_download

    files = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    try:
        local = Path(snapshot_download(str(path), allow_patterns=files))
        if not list(local.glob("*.safetensors")):  # an older checkpoint: pytorch_model*.bin
            local = Path(snapshot_download(str(path), allow_patterns=[*files, "*.bin"]))
    except Exception as err:  # offline, unknown repo, gated repo, network: all mean "cannot get it"
        raise ConfigError(key, f"cannot get '{path}' from the Hugging Face hub: {err}",
                          "check the id and access, or download it and give the local directory.") from err
    return local


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


def teacher_dtype(precision: str) -> torch.dtype:
    """The teacher's dtype for a Lightning precision: bf16-* -> bfloat16, 16-* -> float16, else float32."""
    p = str(precision)
    return torch.bfloat16 if p.startswith("bf16") else torch.float16 if p.startswith("16") else torch.float32


def _content_digest(f: Path) -> str:
    """A file's sha256; a hub-cache symlink names its blob by that sha256 already (no re-hashing)."""
    if f.is_symlink():
        blob = Path(os.readlink(f)).name
        if re.fullmatch(r"[0-9a-f]{64}", blob):
            return blob
    return file_sha256(f)


def hf_teacher_ref(directory: Path) -> dict[str, str]:
    """{path, sha256} of a checkpoint: one hash over config.json and every weights file."""
    files = sorted({f for pat in WEIGHT_PATTERNS for f in directory.glob(pat)} | {directory / "config.json"})
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name} {_content_digest(f)}\n".encode())
    return {"path": str(directory), "sha256": h.hexdigest()}


def read_hf_teacher_config(path: str | os.PathLike, key: str = KEY) -> ModelConfig:
    """The teacher's architecture as our ModelConfig (ConfigError for a family a student cannot mirror)."""
    from transformers import AutoConfig

    local = resolve_hf_path(path, key)
    try:
        hf_cfg = AutoConfig.from_pretrained(str(local), local_files_only=True)
    except Exception as err:  # unknown model_type, malformed json
        raise ConfigError(key, f"cannot read the config of '{local}': {err}") from err
    return model_config_from_hf(hf_cfg, name=local.name, key=key)


class HFTeacher(torch.nn.Module):
    """A transformers causal LM behind the interface DistillModule uses: ``teacher(idx).logits``."""

    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, idx: torch.Tensor) -> Any:
        return self.hf(input_ids=idx, use_cache=False)

    def as_gpt(self, student: ModelConfig) -> GPT:
        """This teacher in our layout, shaped for `student` to be initialised from (students/hf.py)."""
        return teacher_gpt_for_student(self.hf, student)


def load_hf_teacher(path: str | os.PathLike, dtype: torch.dtype = torch.float32, key: str = KEY) -> HFTeacher:
    """Load the teacher frozen: eval mode, no gradients."""
    from transformers import AutoModelForCausalLM

    local = resolve_hf_path(path, key)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(local), dtype=dtype, local_files_only=True)
    except Exception as err:
        raise ConfigError(key, f"transformers cannot load a causal LM from '{local}': {err}") from err
    return HFTeacher(model).eval().requires_grad_(False)


def hf_teacher_source(cfg: Any) -> tuple[ModelConfig, Any, dict[str, str]]:
    """`distill.distill.teacher_source` for `teacher.kind=hf`: (architecture, loader, {path, sha256})."""
    local = resolve_hf_path(cfg.teacher.path)
    teacher_cfg = read_hf_teacher_config(local)
    loader = partial(load_hf_teacher, local, teacher_dtype(cfg.trainer.precision))
    return teacher_cfg, loader, hf_teacher_ref(local)


def use_teacher_tokenizer(cfg: Any) -> Any:
    """With `teacher.kind=hf`, a copy of `cfg` whose data tokenizer is the teacher's; else `cfg` itself.

    An explicitly configured pretrained tokenizer is kept if its vocabulary is the teacher's; one that
    differs is a ConfigError naming `data.tokenizer.path`.
    """
    if cfg.teacher.kind != "hf":
        return cfg
    if cfg.teacher.path is None:
        raise ConfigError(KEY, "teacher.kind=hf needs a checkpoint.", "set teacher.path=<local dir or hub id>.")
    from distill.data.tokenizer import load_pretrained

    local = resolve_hf_path(cfg.teacher.path)
    tok = cfg.data.tokenizer
    if tok.kind == "pretrained" and tok.path:
        given = Path(tok.path).expanduser().resolve()
        if given != local and has_tokenizer(local):
            theirs = load_pretrained(tok).backend.get_vocab(with_added_tokens=True)
            mine = load_pretrained(OmegaConf.create({"path": str(local), "eos_token": None}))
            if theirs != mine.backend.get_vocab(with_added_tokens=True):
                raise ConfigError(
                    "data.tokenizer.path",
                    f"{given} is not the teacher's tokenizer ({local}): their vocabularies differ.",
                    "leave data.tokenizer unset with teacher=hf (the teacher's own is used).",
                )
        return cfg
    if not has_tokenizer(local):
        raise ConfigError(
            "data.tokenizer.path", f"the teacher at {local} has no tokenizer files {list(TOKENIZER_FILES)}.",
            "set data.tokenizer.kind=pretrained data.tokenizer.path=<the teacher's tokenizer>.",
        )
    cfg = cfg.copy()
    OmegaConf.update(cfg, "data.tokenizer.kind", "pretrained")
    OmegaConf.update(cfg, "data.tokenizer.path", str(local))
    return cfg


def load_hf_teacher_as_gpt(path: str | os.PathLike, key: str = KEY) -> GPT:
    """The whole teacher converted to our GPT (e.g. to time generation the way the students are timed)."""
    return gpt_from_hf(load_hf_teacher(path, key=key).hf)
