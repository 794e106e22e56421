"""The `eval` config node of `python -m distill.evaluate` (conf/evaluate.yaml), with its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional  # noqa: UP035 (OmegaConf structured-config schema)

from distill.errors import ConfigError

# The DeepSpeed-MoE paper's six zero-shot tasks (Rajbhandari et al., 2022, table 2), as lm-eval names them:
# `eval.tasks=[paper]` expands to them. They need their datasets (the Hugging Face hub, or its cache).
PAPER_TASKS = ("lambada_openai", "piqa", "boolq", "race", "triviaqa", "webqs")
OWN_TASK = "distill_continuation"  # the project's own multiple-choice task, built from the test split
SPLITS = ("test", "validation")


@dataclass
class ContinuationTaskConfig:
    """`eval.continuation`: the multiple-choice task built from the test split (distill/eval_tasks)."""

    num_examples: int = 200  # passages (documents too short for one are skipped)
    num_choices: int = 4  # the true continuation + distractors from other documents
    context_tokens: int = 48  # passage length, in the model's tokens
    continuation_tokens: int = 12  # each choice's length, in the model's tokens
    seed: int = 0

    def validate(self) -> ContinuationTaskConfig:
        for key in ("num_examples", "context_tokens", "continuation_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval.continuation.{key}", f"must be >= 1, got {getattr(self, key)}.")
        if self.num_choices < 2:
            raise ConfigError("eval.continuation.num_choices", f"must be >= 2, got {self.num_choices}.",
                              "e.g. 4: the true continuation and 3 distractors.")
        return self


@dataclass
class EvalSettings:
    """What `python -m distill.evaluate` evaluates and how."""

    model: Optional[str] = None  # an export directory of distill, or a Lightning .ckpt of it
    tokenizer: Optional[str] = None  # its tokenizer.json; null: the one beside the model (<run>/export)
    tasks: List[str] = field(default_factory=lambda: [OWN_TASK])  # lm-eval task names; `paper` expands
    num_fewshot: Optional[int] = None  # null: each task's default (0 for the paper's zero-shot tasks)
    limit: Optional[float] = None  # examples per task (a fraction when < 1); null: all
    batch_size: int = 8  # lm-eval's batch size, and the perplexity batch size
    perplexity: List[str] = field(default_factory=lambda: list(SPLITS))  # splits to measure; [] skips it
    device: str = "auto"  # auto: cuda when available, else cpu
    hf_dir: Optional[str] = None  # where the transformers export goes; null: <out_dir>/hf
    continuation: ContinuationTaskConfig = field(default_factory=ContinuationTaskConfig)

    def validate(self) -> EvalSettings:
        if not self.model:
            raise ConfigError("eval.model", "no model given.", "set eval.model=<export dir> (python -m "
                              "distill.pretrain / distill.distill write <run dir>/export) or a .ckpt file.")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError("eval.num_fewshot", f"must be >= 0 or null, got {self.num_fewshot}.")
        if self.limit is not None and not self.limit > 0:
            raise ConfigError("eval.limit", f"must be > 0 or null, got {self.limit}.",
                              "e.g. eval.limit=100 (examples per task), or 0.1 (a tenth of each task).")
        if self.batch_size < 1:
            raise ConfigError("eval.batch_size", f"must be >= 1, got {self.batch_size}.")
        for split in self.perplexity:
            if split not in SPLITS:
                raise ConfigError("eval.perplexity", f"unknown split {split!r}.", f"use a subset of {list(SPLITS)}.")
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps")):
            raise ConfigError("eval.device", f"unknown device {self.device!r}.", "use auto, cpu or cuda[:i].")
        self.continuation.validate()
        return self

    def task_names(self) -> list[str]:
        """`tasks` with `paper` expanded, in order, without repeats."""
        names: list[str] = []
        for t in self.tasks:
            for name in PAPER_TASKS if t == "paper" else (t,):
                if name not in names:
                    names.append(name)
        return names
