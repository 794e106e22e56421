"""Teachers from Hugging Face (``teacher=hf``): a local or hub causal-LM checkpoint run through
`transformers`, frozen.

    python -m distill.distill teacher=hf teacher.path=<save_pretrained dir or hub id> ...

The teacher's own tokenizer becomes the data's tokenizer (`HFTeacher.data_tokenizer`); its architecture,
converted to our ModelConfig (distill/interop), is what the Mixture-of-Students is derived from. The
teacher runs in the dtype the trainer's precision implies (bf16 / fp16 / fp32), in eval mode, with no
gradients; DistillModule calls it under inference mode and trims padding-only vocabulary entries.

Sharded (`load_sharded`, a strategy's teacher layout) the teacher is our GPT converted by the weight rules
(distill/interop), each rank reading only its slices of the safetensors files (one file, or the shards a
``model.safetensors.index.json`` lists); a checkpoint of ``.bin`` files only is loaded whole and sliced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from distill.data.config import TokenizerConfig
from distill.errors import ConfigError
from distill.export import file_sha256
from distill.interop import gpt_from_hf, model_config_from_hf, teacher_gpt_for_student
from distill.interop.hf_weights import hf_file_tensors
from distill.models import GPT, ModelConfig
from distill.parallel.load import LazyTensor, SafetensorsFiles
from teachers.base import KEY, TeacherRef, TeacherSource, safetensors_shapes

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
INDEX = "model.safetensors.index.json"
FIX = "re-download or re-save the checkpoint; a weights file is missing, damaged or incomplete."


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


def safetensors_files(directory: Path) -> tuple[list[Path], dict[str, str]]:
    """(the checkpoint's safetensors files, tensor name -> file name of its index). With an index, the files
    it lists (whether they exist or not: a missing one is named by whoever opens it); else every
    ``*.safetensors`` file of the directory."""
    index = directory / INDEX
    if not index.is_file():
        return sorted(directory.glob("*.safetensors")), {}
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(KEY, f"{index} is not a valid safetensors index ({err!r}).", FIX) from None
    return [directory / name for name in names], weight_map


def open_safetensors(directory: Path) -> SafetensorsFiles | None:
    """The checkpoint's safetensors files, headers checked (ConfigError naming a missing or truncated file,
    or a tensor not where the index says); None when it has none (``.bin`` files only)."""
    files, weight_map = safetensors_files(directory)
    if not files:
        return None
    opened = SafetensorsFiles(files, KEY, FIX)
    for name, file in weight_map.items():
        if opened.where.get(name) != directory / file:
            raise ConfigError(KEY, f"{directory / INDEX} places `{name}` in {directory / file}, which lacks it.", FIX)
    return opened


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


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


class HFCausalLM(torch.nn.Module):
    """A transformers causal LM behind the interface DistillModule uses: ``teacher(idx).logits``."""

    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, idx: torch.Tensor) -> Any:
        return self.hf(input_ids=idx, use_cache=False)


class HFTeacher(TeacherSource):
    """A `save_pretrained` directory or a hub model id of a supported family (`distill.interop.FAMILIES`:
    Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, DeepSeek-V2/V3)."""

    def __init__(self, path: str | os.PathLike | None):
        super().__init__(path)
        self.dir = resolve_hf_path(path)  # type: ignore[arg-type]

    def read_architecture(self) -> ModelConfig:
        from transformers import AutoConfig

        try:
            hf_cfg = AutoConfig.from_pretrained(str(self.dir), local_files_only=True)
        except Exception as err:  # unknown model_type, malformed json
            raise ConfigError(KEY, f"cannot read the config of '{self.dir}': {err}") from err
        return model_config_from_hf(hf_cfg, name=self.dir.name, key=KEY)

    @cached_property
    def _identity(self) -> TeacherRef:
        return TeacherRef(**hf_teacher_ref(self.dir))

    def identity(self) -> TeacherRef:
        return self._identity

    def verify(self) -> None:
        """Every safetensors file (each one its index lists) exists and has a complete header (.bin files are
        checked when transformers loads them)."""
        for file in sorted(set(self.dir.glob("*.safetensors")) | set(safetensors_files(self.dir)[0])):
            if not file.is_file():
                raise ConfigError(KEY, f"the weights file {file} is missing.", FIX)
            safetensors_shapes(file)

    def sharded_tensors(self) -> Mapping[str, LazyTensor]:
        """Our GPT's tensors as lazy views of the safetensors files (converted region by region)."""
        files = open_safetensors(self.dir)
        if files is None:  # .bin files cannot be sliced: load whole, convert, slice
            return super().sharded_tensors()
        return hf_file_tensors(self.architecture(), files, KEY)

    def data_tokenizer(self, configured: TokenizerConfig) -> TokenizerConfig:
        """The teacher's own tokenizer. An explicitly configured pretrained tokenizer is kept if its vocabulary
        is the teacher's; one that differs is a ConfigError naming `data.tokenizer.path`."""
        from distill.data.tokenizer import load_pretrained

        local = self.dir
        if configured.kind == "pretrained" and configured.path:
            given = Path(configured.path).expanduser().resolve()
            if given != local and has_tokenizer(local):
                theirs = load_pretrained(configured).backend.get_vocab(with_added_tokens=True)
                mine = load_pretrained(TokenizerConfig(kind="pretrained", path=str(local)))
                if theirs != mine.backend.get_vocab(with_added_tokens=True):
                    raise ConfigError(
                        "data.tokenizer.path",
                        f"{given} is not the teacher's tokenizer ({local}): their vocabularies differ.",
                        "leave data.tokenizer unset with teacher=hf (the teacher's own is used).",
                    )
            return configured
        if not has_tokenizer(local):
            raise ConfigError(
                "data.tokenizer.path", f"the teacher at {local} has no tokenizer files {list(TOKENIZER_FILES)}.",
                "set data.tokenizer.kind=pretrained data.tokenizer.path=<the teacher's tokenizer>.",
            )
        return replace(configured, kind="pretrained", path=str(local))

    def load(self, dtype: torch.dtype = torch.float32) -> HFCausalLM:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(self.dir), dtype=dtype, local_files_only=True)
        except Exception as err:
            raise ConfigError(KEY, f"transformers cannot load a causal LM from '{self.dir}': {err}") from err
        return HFCausalLM(model).eval().requires_grad_(False)

    def student_init_model(self, student: ModelConfig) -> GPT:
        """Converted to our layout and shaped like the student (distill/interop)."""
        return teacher_gpt_for_student(self.load().hf, student)

    def as_gpt(self) -> GPT:
        return gpt_from_hf(self.load().hf)
