"""`python -m distill.evaluate` on a tiny exported student and tiny data: perplexity and the project's own
lm-eval task through lm-eval's real code path (`simple_evaluate` + `HFLM` on the exported directory), each
checked against a direct computation with our GPT."""

from __future__ import annotations

import builtins
import collections
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from distill.config import register_configs
from distill.data.config import DataConfig, TokenizerConfig
from distill.data.datamodule import LMDataModule
from distill.errors import ConfigError
from distill.eval_tasks import read_examples
from distill.evaluate.app import resolve_evaluate, run_evaluate
from distill.evaluate.config import PAPER_TASKS, EvalSettings
from distill.export import export_model
from distill.models import GPT, ModelConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
DATA = ["data.source=hf", "data.path=json", "data.test_fraction=0.1", "data.val_fraction=0.1", "data.seq_len=32",
        "data.tokenizer.vocab_size=384", "data.batch_size=8"]
TASK = ["eval.limit=10", "eval.batch_size=64", "eval.continuation.num_examples=10",
        "eval.continuation.context_tokens=24", "eval.continuation.continuation_tokens=8"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real text, small: the longer docstrings of a few standard-library modules, one document each."""
    docs = []
    for mod in (builtins, os, itertools, functools, collections, str):
        for name in sorted(dir(mod)):
            doc = inspect.getdoc(getattr(mod, name, None))
            if doc and len(doc) > 300 and doc not in docs:
                docs.append(doc)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:160]))
    return path


@pytest.fixture(scope="module")
def data(corpus: Path) -> LMDataModule:
    dm = LMDataModule(DataConfig(source="hf", path="json", data_files=str(corpus), test_fraction=0.1, val_fraction=0.1, seq_len=32,
                                 batch_size=8, tokenizer=TokenizerConfig(vocab_size=384)).validate())
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def student(data: LMDataModule, tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, Path]:
    """A residual PR-MoE (pyramid 2 -> 4 experts), dropless: its loss does not depend on how lm-eval batches."""
    cfg = ModelConfig.from_dict(dict(name="s", vocab_size=data.vocab_size, d_model=32, n_layers=4, n_heads=4,
                                     max_seq_len=64, num_experts=[2, 4],
                                     moe=dict(residual=True, dropless=True))).validate()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    return model, export_model(model, cfg, tmp_path_factory.mktemp("student") / "export", tokenizer=data.tokenizer)


def compose_cfg(out: Path, corpus: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="evaluate", overrides=[f"out_dir={out}", *DATA, f"data.data_files={corpus}",
                                                          *overrides])


def loglikelihoods(model: GPT, tok, pairs: list[tuple[str, str]]) -> list[float]:
    """lm-eval's split of each (context, continuation) into tokens, then the continuation's summed log-prob
    (one right-padded batch: exact for a causal, dropless model)."""
    seqs = []
    for context, choice in pairs:
        whole, ctx = tok.encode(context + choice), tok.encode(context)
        seqs.append((ctx + whole[len(ctx):], len(whole) - len(ctx)))
    width = max(len(s) for s, _ in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s, _ in seqs])
    with torch.no_grad():
        logp = model(ids[:, :-1]).logits.log_softmax(-1)
    out = []
    for row, (s, n) in enumerate(seqs):
        positions = torch.arange(len(s) - 1 - n, len(s) - 1)
        out.append(logp[row, positions, torch.tensor(s[-n:])].sum().item())
    return out


def test_evaluate_app_matches_direct_computation(data: LMDataModule, student: tuple[GPT, Path], corpus: Path,
                                                 tmp_path: Path) -> None:
    model, export = student
    summary = run_evaluate(resolve_evaluate(compose_cfg(tmp_path, corpus, f"eval.model={export}", *TASK)))
    assert json.loads((tmp_path / "evaluation.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["export"] == "remote" and (tmp_path / "hf" / "modeling_distill.py").is_file()
    # perplexity: exp of the mean next-token CE over every block of the split
    for split in ("test", "validation"):
        ids = torch.as_tensor(data.blocks[split]["input_ids"], dtype=torch.long)
        with torch.no_grad():
            ce = F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
        got = summary["perplexity"][split]
        assert got["tokens"] == ids[:, 1:].numel()
        assert got["loss"] == pytest.approx(ce.item(), rel=1e-5)
        assert got["ppl"] == pytest.approx(math.exp(ce.item()), rel=1e-5)
    # the own task, as lm-eval ran it (its first `limit` examples), scored directly with our GPT
    examples = read_examples(tmp_path / "eval_tasks")
    assert len(examples) == 10 and all(len(e["choices"]) == 4 for e in examples)
    acc = acc_norm = 0
    flat = loglikelihoods(model, data.tokenizer, [(e["context"], c) for e in examples for c in e["choices"]])
    for k, e in enumerate(examples):
        lls = flat[4 * k : 4 * k + 4]
        acc += max(range(4), key=lambda i: lls[i]) == e["label"]
        acc_norm += max(range(4), key=lambda i: lls[i] / len(e["choices"][i])) == e["label"]
    metrics = summary["tasks"]["distill_continuation"]
    assert summary["n_samples"]["distill_continuation"] == 10
    assert metrics["acc"] == pytest.approx(acc / 10) and metrics["acc_norm"] == pytest.approx(acc_norm / 10)
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # the wandb table (offline)


def test_bad_input_names_the_key(student: tuple[GPT, Path], corpus: Path, tmp_path: Path) -> None:
    model, export = student
    bare = export_model(model, model.cfg, tmp_path / "bare")  # no tokenizer.json
    with pytest.raises(ConfigError) as err:
        resolve_evaluate(compose_cfg(tmp_path, corpus, f"eval.model={bare}"))
    assert err.value.key == "eval.tokenizer"
    with pytest.raises(ConfigError) as err:
        resolve_evaluate(compose_cfg(tmp_path, corpus, f"eval.model={tmp_path / 'nothing'}"))
    assert err.value.key == "eval.model"
    with pytest.raises(ConfigError) as err:
        resolve_evaluate(compose_cfg(tmp_path, corpus, f"eval.model={export}", "eval.continuation.context_tokens=60"))
    assert err.value.key == "eval.continuation.context_tokens"
    assert EvalSettings(tasks=["paper", "piqa", "distill_continuation"]).task_names() == [
        *PAPER_TASKS, "distill_continuation"]


def test_a_checkpoint_is_evaluated_like_its_export(student: tuple[GPT, Path], corpus: Path, tmp_path: Path) -> None:
    """A Lightning checkpoint of distill (its `model.*` weights and `model_cfg`) with eval.tokenizer given."""
    model, export = student
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "fused_layout": "grouped",
                "hyper_parameters": {"model_cfg": dataclasses.asdict(model.cfg)}}, ckpt)
    spec = resolve_evaluate(compose_cfg(tmp_path, corpus, f"eval.model={ckpt}",
                                        f"eval.tokenizer={export / 'tokenizer.json'}"))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(spec.model(ids).logits, model(ids).logits)


def test_pipeline_evaluate_adds_report_columns(data: LMDataModule, student: tuple[GPT, Path], tmp_path: Path) -> None:
    """`python -m distill.pipeline evaluate=true`: each model's row gets test loss / ppl and the own task's accuracy."""
    from distill.evaluate.pipeline_eval import evaluate_for_report
    from distill.report import write_report

    model, _ = student
    row = evaluate_for_report(model, "student", data, tmp_path, batch_size=64)
    ids = torch.as_tensor(data.blocks["test"]["input_ids"], dtype=torch.long)
    with torch.no_grad():
        ce = F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten()).item()
    assert row["test_loss"] == pytest.approx(ce, rel=1e-5) and row["test_ppl"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert 0.0 <= row["mc_acc"] <= 1.0 and (tmp_path / "student" / "hf" / "config.json").is_file()
    table = write_report(tmp_path, {"student": {"val_loss": 1.0, **row}}, {"student": [(1, 1.0)]})["md"].read_text()
    assert "| test loss | test ppl | MC acc |" in table and f"{100 * row['mc_acc']:.1f}%" in table


@pytest.mark.slow  # a subprocess that indexes lm-eval's tasks: about 20 s on 2 busy cores
def test_unknown_task_exits_2(student: tuple[GPT, Path], corpus: Path, tmp_path: Path) -> None:
    """The real entry point: an lm-eval task that does not exist stops the run before any work, exit 2."""
    _, export = student
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "distill.evaluate", f"eval.model={export}",
                           "eval.tasks=[distill_continuation,piqaa]", f"hydra.run.dir={tmp_path}", *DATA,
                           f"data.data_files={corpus}"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "eval.tasks" in proc.stderr and "piqa" in proc.stderr
    assert not (tmp_path / "hf").exists()
