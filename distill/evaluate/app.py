"""`python -m distill.evaluate`: the composed config -> checks -> perplexity -> export -> lm-eval -> summary.

Everything a user can get wrong is checked before the data is built (`resolve_evaluate`): the model path, its
tokenizer, the task names (against lm-eval's index) and the lengths the model allows. Then, per run directory:

- perplexity on `eval.perplexity` splits (every packed block of `data.seq_len + 1` tokens), with our GPT;
- the model exported for transformers (`distill.hf_remote.export_anywhere`: a family, or its own code) into
  `eval.hf_dir` (default `<out_dir>/hf`), and the project's own task written to `<out_dir>/eval_tasks/`;
- lm-eval's `simple_evaluate` with its `HFLM` on that directory;
- `evaluation.json` (the summary), a printed table and a wandb table (job type "evaluate").
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from distill.config import EvaluateConfig, LoggerConfig
from distill.data.config import DataConfig
from distill.errors import ConfigError
from distill.evaluate.config import OWN_TASK, ContinuationTaskConfig, EvalSettings
from distill.hydra_errors import check_known_keys
from distill.models import GPT

SUMMARY = "evaluation.json"


@dataclass
class EvalSpec:
    data: DataConfig
    logger: LoggerConfig
    eval: EvalSettings
    out_dir: Path
    seed: int
    model: GPT
    tokenizer: Path  # the model's tokenizer.json
    tasks: list[str]
    run_config: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        if self.eval.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.eval.device


def load_native(path: str | os.PathLike, key: str) -> tuple[GPT, Path | None]:
    """Our GPT from an export directory or a Lightning checkpoint (.ckpt) of distill, and the tokenizer.json
    beside it (None if there is none). Every problem is a ConfigError naming ``key``."""
    from teachers.native import CheckpointTeacher, ExportTeacher

    p = Path(path).expanduser()
    try:
        source = CheckpointTeacher(p) if p.is_file() else ExportTeacher(p)
        model = source.load()
    except ConfigError as err:
        raise ConfigError(key, err.problem.replace("teacher=checkpoint", "a .ckpt path"), err.fix) from None
    tokenizer = source.tokenizer_file()
    if tokenizer is None:  # a checkpoint: <run>/checkpoints/x.ckpt -> <run>/export/tokenizer.json
        tokenizer = p.parent.parent / "export" / "tokenizer.json"
    return model, tokenizer if tokenizer.is_file() else None  # type: ignore[return-value]



def _tokenizer_file(ev: EvalSettings, beside: Path | None) -> Path:
    fix = ("set eval.tokenizer=<tokenizer.json> (the tokenizer the model was trained with; python -m distill.pretrain "
           "and distill.distill write it into <run dir>/export).")
    if ev.tokenizer is None:
        if beside is None:
            raise ConfigError("eval.tokenizer", f"no tokenizer.json beside {ev.model}.", fix)
        return beside
    path = Path(ev.tokenizer).expanduser()
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError("eval.tokenizer", f"no tokenizer at '{path}'.", fix)
    return path


def resolve_evaluate(cfg: DictConfig) -> EvalSpec:
    """The checked run description of `python -m distill.evaluate`; ConfigError naming the first bad key."""
    from distill.evaluate.harness import check_tasks, task_manager

    check_known_keys(OmegaConf.to_container(cfg, resolve=False), EvaluateConfig)  # type: ignore[arg-type]
    data: DataConfig = OmegaConf.to_object(cfg.data).validate()  # type: ignore[union-attr]
    logger: LoggerConfig = OmegaConf.to_object(cfg.logger).validate()  # type: ignore[union-attr]
    ev: EvalSettings = OmegaConf.to_object(cfg.eval).validate()  # type: ignore[union-attr]
    model, beside = load_native(ev.model, "eval.model")  # type: ignore[arg-type]
    tokenizer = _tokenizer_file(ev, beside)
    tasks = ev.task_names()
    others = [t for t in tasks if t != OWN_TASK]
    if others:
        check_tasks(others, task_manager().all_tasks)
    max_len = model.cfg.max_seq_len
    c = ev.continuation
    if OWN_TASK in tasks and c.context_tokens + c.continuation_tokens > max_len:
        raise ConfigError("eval.continuation.context_tokens", f"context_tokens + continuation_tokens = "
                          f"{c.context_tokens + c.continuation_tokens} exceeds the model's max_seq_len={max_len}.",
                          "lower eval.continuation.context_tokens.")
    if ev.perplexity and data.seq_len > max_len:
        raise ConfigError("data.seq_len", f"{data.seq_len} exceeds the model's max_seq_len={max_len}.",
                          f"set data.seq_len={max_len} (or less).")
    return EvalSpec(data=data, logger=logger, eval=ev, out_dir=Path(cfg.out_dir), seed=int(cfg.seed), model=model,
                    tokenizer=tokenizer, tasks=tasks,
                    run_config=OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]


def check_data_tokenizer(tokenizer_file: Path, data_tokenizer: Any) -> None:
    """The data must be tokenized with the model's tokenizer (the same token -> id map)."""
    from tokenizers import Tokenizer

    theirs = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    if theirs != data_tokenizer.backend.get_vocab(with_added_tokens=True):
        raise ConfigError("data.tokenizer", f"the data's tokenizer is not the model's ({tokenizer_file}).",
                          f"data.tokenizer.kind=pretrained data.tokenizer.path={tokenizer_file}, or the data "
                          "overrides the model was trained with.")


def own_task(dm: Any, c: ContinuationTaskConfig, directory: Path) -> Path:
    """Write the project's multiple-choice task (from `dm`'s test split) into ``directory``; returns it."""
    from distill.eval_tasks import build_examples, write_task

    docs = dm.tokenizer.encode_batch(list(dm.corpus["test"]["text"]))
    examples = build_examples(docs, dm.tokenizer.decode, c.num_examples, c.num_choices, c.context_tokens,
                              c.continuation_tokens, c.seed)
    if not examples:
        raise ConfigError("eval.continuation.context_tokens", "no test document is long enough for one passage "
                          f"({c.context_tokens} + {c.continuation_tokens} tokens) with {c.num_choices} choices.",
                          "lower eval.continuation.context_tokens, or raise data.test_fraction.")
    write_task(directory, examples)
    return directory


def rows_of(summary: dict[str, Any]) -> list[list[Any]]:
    """The summary as (metric, value) rows: `<split>/loss`, `<split>/ppl`, `<task>/<metric>`."""
    rows: list[list[Any]] = []
    for split, p in summary["perplexity"].items():
        rows += [[f"{split}/loss", p["loss"]], [f"{split}/ppl", p["ppl"]]]
    for task, metrics in summary["tasks"].items():
        rows += [[f"{task}/{name}", value] for name, value in metrics.items()]
    return rows


def run_evaluate(spec: EvalSpec) -> dict[str, Any]:
    import transformers

    from distill.data.datamodule import LMDataModule
    from distill.evaluate.harness import run_harness
    from distill.evaluate.perplexity import perplexity
    from distill.hf_remote.export import export_anywhere
    from distill.tracking.report import log_report

    ev, out = spec.eval, spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    dm = None
    if ev.perplexity or OWN_TASK in spec.tasks:
        dm = LMDataModule(spec.data)
        dm.prepare_data()
        dm.setup()
        check_data_tokenizer(spec.tokenizer, dm.tokenizer)
    model = spec.model.to(spec.device)
    ppl = {split: perplexity(model, dm.blocks[split], ev.batch_size, spec.device) for split in ev.perplexity}
    for split, p in ppl.items():
        print(f"[evaluate] {split}: loss {p['loss']:.4f}, ppl {p['ppl']:.2f} over {p['tokens']:,} tokens", flush=True)
    hf_dir, kind = export_anywhere(model.cpu(), ev.hf_dir or out / "hf", spec.tokenizer, key="eval.tokenizer")
    print(f"[evaluate] exported for transformers ({kind}): {hf_dir}", flush=True)
    harness: dict[str, Any] = {"metrics": {}, "n_samples": {}}
    if spec.tasks:
        include = own_task(dm, ev.continuation, out / "eval_tasks") if OWN_TASK in spec.tasks else None
        harness = run_harness(hf_dir, spec.tasks, include_path=include, num_fewshot=ev.num_fewshot, limit=ev.limit,
                              batch_size=ev.batch_size, device=spec.device, seed=spec.seed)
    summary = {
        "model": str(Path(ev.model).expanduser().resolve()),  # type: ignore[arg-type]
        "hf_dir": str(Path(hf_dir).resolve()), "export": kind, "perplexity": ppl,
        "tasks": harness["metrics"], "n_samples": harness["n_samples"],
        "num_fewshot": ev.num_fewshot, "limit": ev.limit,
        "versions": {"transformers": transformers.__version__, "lm_eval": harness.get("lm_eval"),
                     "torch": torch.__version__, "python": platform.python_version()},
    }
    tmp = out / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / SUMMARY)
    rows = rows_of(summary)
    print("\n| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v:.4f} |" for k, v in rows), flush=True)
    print(f"[evaluate] summary: {out / SUMMARY}", flush=True)
    log_report(spec.logger, out, job_type="evaluate", name="evaluate", table=(["metric", "value"], rows),
               images={}, summary=dict(rows), config=spec.run_config)
    return summary
