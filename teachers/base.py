"""The one interface every teacher source implements (docs/architecture.md, "Teacher sources").

A source is built from ``conf/teacher/<kind>.yaml`` by ``hydra.utils.instantiate`` (its ``_target_`` is
the class, ``path`` its argument) and answers everything the apps ask of a teacher:

- ``architecture()``: the teacher as our :class:`~distill.models.ModelConfig` (the student is derived from
  it), read without loading weights and validated once;
- ``data_tokenizer(configured)``: the tokenizer the data must use (a Hugging Face teacher's own);
  ``check_vocab(tokenizer)``: the built tokenizer is the teacher's;
- ``identity()``: its path and content hash (a student checkpoint records it);
- ``verify()``: the weights files are readable and agree with the architecture (cheap: headers only);
- ``load(dtype)``: the frozen model (eval mode, no gradients), whose output has ``.logits``;
- ``load_sharded(dtype, mesh)``: the same as our GPT laid out on a device mesh (the teacher's own layout),
  built on the meta device, each rank reading only its slices of the weights (``sharded_tensors``);
  `TeacherLoader` carries a source and its dtype to where the model is built;
- ``student_init_model(student)`` / ``as_gpt()``: its weights in our layout, for a student's
  initialisation and for timing generation the way the students are timed.

Every problem is a ``ConfigError`` naming ``teacher.path``. No other code asks which kind a teacher is.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from distill.data.config import TokenizerConfig
from distill.errors import ConfigError
from distill.models import GPT, ModelConfig
from distill.parallel.load import LazyTensor, Loaded, SafetensorsFiles, build_sharded, lazy_reader

KEY = "teacher.path"


@dataclass(frozen=True)
class TeacherRef:
    """Which teacher: its path and the sha256 of its weights (what a student checkpoint records)."""

    path: str
    sha256: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def expected_shapes(cfg: ModelConfig) -> list[dict[str, tuple[int, ...]]]:
    """The tensors of our GPT for ``cfg`` (built on the meta device: no memory), grouped by parameter:
    tied weights (embedding and head) form one group, any one of whose names a file may hold."""
    with torch.device("meta"):
        model = GPT(cfg)
    groups: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), {})[name] = tuple(tensor.shape)
    return list(groups.values())


def check_state_shapes(found: dict[str, tuple[int, ...]], cfg: ModelConfig, where: str) -> None:
    """ConfigError(teacher.path) unless the tensors ``found`` in ``where`` are exactly those of ``cfg``."""
    fix = "re-export the teacher (python -m distill.pretrain writes <run dir>/export), or point teacher.path at an intact one."
    known: set[str] = set()
    for group in expected_shapes(cfg):
        known.update(group)
        present = [name for name in group if name in found]
        if not present:
            raise ConfigError(KEY, f"{where} lacks the tensor `{next(iter(group))}` its config.json implies.", fix)
        for name in present:
            if tuple(found[name]) != group[name]:
                raise ConfigError(KEY, f"{where}: tensor `{name}` has shape {tuple(found[name])}, but its "
                                  f"config implies {group[name]} (weights and config disagree).", fix)
    extra = sorted(set(found) - known)
    if extra:
        raise ConfigError(KEY, f"{where} holds tensors its config has no place for, e.g. `{extra[0]}`.", fix)


def with_tied_names(found: Mapping[str, LazyTensor], cfg: ModelConfig) -> dict[str, LazyTensor]:
    """``found`` (tensors by our names) with every name of a tied group (embedding and head) mapped to the
    one the weights hold."""
    out = dict(found)
    for group in expected_shapes(cfg):
        present = [name for name in group if name in found]
        if present:
            out.update({name: found[present[0]] for name in group if name not in found})
    return out


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes in a safetensors file, from its header (no tensor is read); ConfigError when the file
    is not a complete safetensors file (garbage, truncated)."""
    return SafetensorsFiles([file], KEY).shapes()


class TeacherSource(ABC):
    """Where a teacher comes from (see the module docstring). Subclasses read ``self.path``."""

    def __init__(self, path: str | os.PathLike | None):
        if path is None or str(path) == "":
            raise ConfigError(KEY, "no teacher given.",
                              "set teacher.path=<export dir> (python -m distill.pretrain writes <run dir>/export), "
                              "teacher=checkpoint teacher.path=<.ckpt>, or teacher=hf teacher.path=<Hugging Face "
                              "dir or hub id>.")
        self.path = path

    @cached_property
    def _architecture(self) -> ModelConfig:
        cfg = self.read_architecture()
        try:
            return cfg.validate()
        except ConfigError as err:
            raise ConfigError(KEY, f"the teacher's architecture is invalid ({err.key}: {err.problem})",
                              "point teacher.path at an intact teacher.") from None

    def architecture(self) -> ModelConfig:
        """The teacher's architecture, read (and validated) once."""
        return self._architecture

    @abstractmethod
    def read_architecture(self) -> ModelConfig:
        """Read the teacher's config (without its weights)."""

    @abstractmethod
    def identity(self) -> TeacherRef: ...

    @abstractmethod
    def verify(self) -> None:
        """ConfigError unless the weights are readable and fit the architecture (headers only)."""

    @abstractmethod
    def load(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The teacher, frozen: eval mode, no gradients; ``model(idx).logits``."""

    def sharded_tensors(self) -> Mapping[str, LazyTensor]:
        """Our GPT's tensors by name, read region by region when asked. Checks the weights files (headers,
        shapes) first: every problem is a ConfigError raised on every rank before any collective. By default
        the whole teacher is loaded (`as_gpt`) and sliced; sources with sliceable files override this."""
        return {name: Loaded(t) for name, t in self.as_gpt().state_dict().items()}

    def load_sharded(self, dtype: torch.dtype, mesh: Any) -> torch.nn.Module:
        """The teacher as our GPT laid out on `mesh` (a ParallelMesh: the teacher's own layout), frozen; each
        rank reads only its slices. Collective: every rank calls it."""
        tensors = self.sharded_tensors()  # before any collective: bad files raise on every rank
        return build_sharded(self.architecture(), mesh, lazy_reader(tensors, KEY), dtype)

    def tokenizer_file(self) -> Path | None:
        """The teacher's tokenizer.json, when it has one to compare the data's with."""
        return None

    def data_tokenizer(self, configured: TokenizerConfig) -> TokenizerConfig:
        """The tokenizer the data must use with this teacher (by default the configured one)."""
        return configured

    def check_vocab(self, tokenizer: Any) -> None:
        """The data's tokenizer must be the teacher's: the same token -> id map (the teacher may only have
        extra padding rows); compared entry by entry when the teacher has its tokenizer.json."""
        from tokenizers import Tokenizer

        vocab = self.architecture().vocab_size
        file = self.tokenizer_file()
        fix = (f"use the teacher's tokenizer: data.tokenizer.kind=pretrained data.tokenizer.path={file}"
               if file else "use the tokenizer the teacher was trained with (data.tokenizer.*).")
        if vocab < tokenizer.vocab_size:
            raise ConfigError("data.tokenizer", f"the teacher's vocabulary ({vocab}) is smaller than the data "
                              f"tokenizer's ({tokenizer.vocab_size}): teacher and student must share the "
                              "vocabulary.", fix)
        if file is None or not file.is_file():
            return
        theirs = Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)
        ours = tokenizer.backend.get_vocab(with_added_tokens=True)
        if theirs != ours:
            differ = len(set(theirs.items()) ^ set(ours.items())) // 2 or abs(len(theirs) - len(ours))
            raise ConfigError("data.tokenizer", f"the data's tokenizer ({len(ours)} entries) is not the teacher's "
                              f"({len(theirs)} entries, {file}): about {differ} token ids differ, so the KD term "
                              "would compare different tokens.", fix)

    def student_init_model(self, student: ModelConfig) -> GPT:
        """The teacher in our layout, for `students.mos.init_student_from_teacher`."""
        return self.load()  # type: ignore[return-value]

    def as_gpt(self) -> GPT:
        """The whole teacher as our GPT (generation is timed the way the students' is)."""
        return self.load()  # type: ignore[return-value]


@dataclass
class TeacherLoader:
    """A teacher source and the dtype to run it in: ``loader()`` loads it whole (one process or data
    parallelism), ``loader.sharded(mesh)`` lays it out on a device mesh (a strategy's teacher layout).
    ``internals``: router and hidden-state KD read the teacher's router logits and block outputs, which only
    our GPT gives, so the teacher is loaded as our GPT (`as_gpt`; a Hugging Face teacher converted, its
    logits equal to transformers' as tests/test_hf.py checks) instead of its own class."""

    source: TeacherSource
    dtype: torch.dtype = torch.float32
    internals: bool = False

    def __call__(self) -> torch.nn.Module:
        if self.internals:
            return self.source.as_gpt().to(self.dtype).eval().requires_grad_(False)
        return self.source.load(self.dtype)

    def sharded(self, mesh: Any) -> torch.nn.Module:
        return self.source.load_sharded(self.dtype, mesh)
