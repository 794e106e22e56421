"""The pipeline's optional evaluation of every model (`evaluate=true`): test-split perplexity and the accuracy
on the project's own lm-eval task, the same measurements `python -m distill.evaluate` makes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill.errors import ConfigError, warn
from distill.evaluate.config import OWN_TASK, ContinuationTaskConfig


def evaluate_for_report(model: torch.nn.Module, name: str, dm: Any, out_dir: Path, batch_size: int) -> dict[str, Any]:
    """{"test_loss", "test_ppl", "mc_acc"} of ``model``: perplexity over every test block, then the model exported
    for transformers (<out_dir>/<name>/hf) and `distill_continuation` (written once into <out_dir>/eval_tasks)
    run through lm-eval."""
    from distill.evaluate.app import own_task
    from distill.evaluate.harness import run_harness
    from distill.evaluate.perplexity import perplexity
    from distill.hf_remote import export_anywhere

    device = next(model.parameters()).device
    ppl = perplexity(model, dm.blocks["test"], batch_size, device)
    tasks, acc = out_dir / "eval_tasks", None
    if not (tasks / f"{OWN_TASK}.yaml").is_file():
        c = ContinuationTaskConfig()
        c.context_tokens = max(1, min(c.context_tokens, model.cfg.max_seq_len - c.continuation_tokens))
        try:
            own_task(dm, c, tasks)
        except ConfigError as err:  # e.g. a test split of a handful of documents: report perplexity only
            warn(f"evaluate=true: no {OWN_TASK} task ({err.problem})")
            return {"test_loss": ppl["loss"], "test_ppl": ppl["ppl"], "mc_acc": None}
    hf_dir, _ = export_anywhere(model, out_dir / name / "hf", dm.tokenizer, key="data.tokenizer")
    res = run_harness(hf_dir, [OWN_TASK], include_path=tasks, num_fewshot=None, limit=None, batch_size=batch_size,
                      device="cuda" if device.type == "cuda" else "cpu")
    acc = res["metrics"].get(OWN_TASK, {}).get("acc")
    print(f"[evaluate] {name}: test loss {ppl['loss']:.4f}, ppl {ppl['ppl']:.2f}; {OWN_TASK} acc {acc}", flush=True)
    return {"test_loss": ppl["loss"], "test_ppl": ppl["ppl"], "mc_acc": acc}
