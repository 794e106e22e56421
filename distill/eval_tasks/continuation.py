"""`distill_continuation`: a multiple-choice task built from the project's own test split, as lm-eval task files.

Each example is a passage of a test document (`context_tokens` tokens at a random offset) and `num_choices`
continuations of `continuation_tokens` tokens: the passage's true next tokens, and windows of the same length
from other test documents. A model scores each choice by its log-likelihood after the passage (lm-eval's
`multiple_choice`: `acc` by summed log-likelihood, `acc_norm` by log-likelihood per byte); chance is
1 / num_choices. Token windows are decoded to text, so lm-eval tokenizes them again, as it does for any task.

`write_task(dir, ...)` writes `distill_continuation.jsonl` and `distill_continuation.yaml` (`dataset_path: json`
with `data_files`), which `lm_eval.tasks.TaskManager(include_path=dir)` reads: evaluation runs offline.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASK = "distill_continuation"


def build_examples(documents: Sequence[Sequence[int]], decode: Any, num_examples: int, num_choices: int,
                   context_tokens: int, continuation_tokens: int, seed: int = 0) -> list[dict[str, Any]]:
    """Examples {"context", "choices", "label"} from tokenized documents (`decode`: ids -> text).

    Passages come from documents long enough for context + continuation, in a seeded random order; the
    distractors from windows of the other documents. The true choice's position is random (seeded)."""
    rng = random.Random(seed)
    need = context_tokens + continuation_tokens
    long_docs = [i for i, d in enumerate(documents) if len(d) >= need]
    sources = [i for i, d in enumerate(documents) if len(d) >= continuation_tokens]
    if len(sources) < num_choices:
        return []
    order = long_docs[:]
    rng.shuffle(order)
    examples = []
    for i in order[:num_examples]:
        doc = documents[i]
        start = rng.randrange(len(doc) - need + 1)
        context = list(doc[start : start + context_tokens])
        true = list(doc[start + context_tokens : start + need])
        choices = [decode(true)]
        for j in rng.sample([s for s in sources if s != i], num_choices - 1):
            other = documents[j]
            at = rng.randrange(len(other) - continuation_tokens + 1)
            choices.append(decode(list(other[at : at + continuation_tokens])))
        label = rng.randrange(num_choices)
        choices[0], choices[label] = choices[label], choices[0]
        examples.append({"context": decode(context), "choices": choices, "label": label})
    return examples


def task_config(data_file: Path) -> dict[str, Any]:
    """The lm-eval task config (what its YAML file holds)."""
    return {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_target": "label",
        "doc_to_choice": "{{choices}}",
        "target_delimiter": "",  # a choice continues the passage's text directly
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }


def write_task(directory: str | Path, examples: list[dict[str, Any]]) -> Path:
    """Write the task's jsonl and YAML into ``directory`` (an lm-eval `include_path`); returns the YAML's path."""
    import yaml

    out = Path(directory).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    path = out / f"{TASK}.yaml"
    path.write_text(yaml.safe_dump(task_config(data), sort_keys=False, allow_unicode=True))
    return path


def read_examples(directory: str | Path) -> list[dict[str, Any]]:
    """The examples `write_task` wrote into ``directory``."""
    lines = (Path(directory) / f"{TASK}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]
