"""Whole-config validation: every bad input names its key and a fix, before any data is built.

Configs are composed in-process with Hydra's compose API from the real conf/ tree; Hydra's own
composition errors are converted exactly as `run_app` converts them in a real run (checked once end to
end in a subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer

from distill.config import SCHEMAS, register_configs
from distill.data.config import EOS_TOKEN
from distill.data.tokenizer import TextTokenizer, byte_tokenizer
from distill.errors import ConfigError, with_fix
from distill.export import export_model
from distill.hydra_errors import config_error_from_hydra
from distill.models import GPT, ModelConfig
from distill.resolve import resolve
from teachers.native import ExportTeacher

ROOT = Path(__file__).resolve().parents[1]
register_configs()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer teacher export with MoE layers of 4 and 8 experts."""
    cfg = ModelConfig.from_dict(dict(name="t", vocab_size=300, d_model=32, n_layers=4, n_heads=2, max_seq_len=16,
                                 num_experts=[4, 8], moe=dict(top_k=1, residual=True))).validate()
    torch.manual_seed(0)
    return export_model(GPT(cfg), cfg, tmp_path_factory.mktemp("teacher") / "export")


def composed(app: str, overrides: list[str]):
    """The config a run of ``app`` composes (its out_dir, a Hydra run-time value, set by hand)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name=app, overrides=["out_dir=/nonexistent/out", *overrides])


def config_error(app: str, overrides: list[str]) -> ConfigError:
    """The ConfigError a run of ``app`` with ``overrides`` stops with (Hydra's errors converted by run_app's rule)."""
    try:
        cfg = composed(app, overrides)
    except Exception as err:
        return config_error_from_hydra(err, SCHEMAS[app])
    with pytest.raises(ConfigError) as caught:
        resolve(cfg, app)
    return with_fix(caught.value)  # as run_app reports it


EP4 = ["strategy=expert_parallel", "trainer.devices=4"]
MESH4 = ["strategy=mesh", "trainer.devices=4"]
BAD = [
    # (app, overrides, key, a piece of the fix)
    ("pretrain", ["model.d_modle=64"], "model.d_modle", "did you mean `model.d_model`?"),
    ("pretrain", ["+trainer.max_step=5"], "trainer.max_step", "did you mean `trainer.max_steps`?"),
    ("pretrain", ["+foo=1"], "foo", "Remove or rename it"),
    ("pretrain", ["trainer.max_steps=abc"], "trainer.max_steps", "give it an integer, e.g. trainer.max_steps=300"),
    ("pretrain", ["model.num_experts=[4,x]"], "model.num_experts[1]", "give it an integer"),
    ("pretrain", ["optim.lr=fast"], "optim.lr", "give it a number, e.g. optim.lr=0.003"),
    ("pretrain", ["seed=null"], "seed", "e.g. seed=0"),
    ("pretrain", ["~trainer.max_steps"], "trainer.max_steps", "set a value instead"),
    ("pretrain", ["model=nope"], "model", "use one of: 1.3b_moe128"),
    ("pretrain", ["trainer.max_steps=["], "trainer.max_steps", "quote values"),
    ("pretrain", ["strategy.timeout_s=2"], "strategy.timeout_s", "select it first, e.g. `strategy=mesh"),
    ("pretrain", ["+strategy.timeout_s=2"], "strategy.timeout_s", "belongs to strategy=mesh"),
    ("pretrain", [*EP4, "+strategy.timeout=2"], "strategy.timeout", "did you mean `strategy.timeout_s`?"),
    ("pretrain", ["parallel.ep=2"], "parallel.ep", "select strategy=mesh"),
    ("pretrain", [*MESH4, "parallel.ep=3"], "parallel.ep", "dp_replicate x dp_shard x ep x tp equal the world size"),
    ("pretrain", [*MESH4, "parallel.dp_shard=3", "parallel.ep=1"], "parallel.dp_shard", "equal the world size"),
    ("pretrain", [*MESH4, "parallel.dp_shard=-1", "parallel.ep=-1"], "parallel.ep", "give parallel.ep a size"),
    ("pretrain", [*MESH4, "parallel.tp=4", "model.n_heads=2"], "parallel.tp", "use a parallel.tp that divides 2"),
    ("pretrain", [*MESH4, "parallel.tp=4", "model.d_ff=130"], "parallel.tp", "divides 130"),
    ("pretrain", [*MESH4, "parallel.tp=3"], "parallel.tp", "equal the world size"),
    ("pretrain", [*MESH4, "parallel.ep=4", "parallel.ep_intra=3"], "parallel.ep_intra", "null for a flat"),
    ("pretrain", [*MESH4, "parallel.activation_checkpointing=some"], "parallel.activation_checkpointing",
     "use none, full or moe_only"),
    ("pretrain", [*MESH4, "trainer.num_nodes=2", "parallel.ep=8", "parallel.ep_intra=8"], "parallel.ep_intra",
     "use a divisor of trainer.devices"),
    ("pretrain", [*MESH4, "parallel.param_dtype=fp8"], "parallel.param_dtype", "use one of"),
    ("pretrain", ["model.moe.top_k=9"], "model.moe.top_k", "lower model.moe.top_k"),
    ("pretrain", ["model.moe.capacity_factor=0"], "model.moe.capacity_factor", "model.moe.dropless=true"),
    ("pretrain", ["model.n_heads=3"], "model.n_heads", "pick n_heads that divides d_model"),
    ("pretrain", [*EP4, "model.num_experts=[4,6]"], "model.num_experts", "multiples of parallel.ep"),
    ("pretrain", [*EP4, "parallel.ep=0"], "parallel.ep", "= trainer.devices x trainer.num_nodes"),
    ("pretrain", ["trainer.max_steps=0"], "trainer.max_steps", "need a finite run"),
    ("pretrain", ["trainer.devices=0"], "trainer.devices", "e.g. trainer.devices=1"),
    ("pretrain", ["optim.lr=0"], "optim.lr", "e.g. optim.lr=3e-4"),
    ("pretrain", ["optim.beta2=1.5"], "optim.beta2", "e.g. 0.9 and 0.95"),
    ("pretrain", ["checkpoint.every_n_steps=0"], "checkpoint.every_n_steps", "e.g. checkpoint.every_n_steps=100"),
    ("pretrain", ["resume=/nonexistent/last.ckpt"], "resume", "use resume=auto"),
    ("pretrain", ["data.val_fraction=1.5"], "data.val_fraction", "must leave documents to train on"),
    ("pretrain", ["data.tokenizer.kind=words"], "data.tokenizer.kind", "use bpe, bytes or pretrained"),
    ("distill", ["teacher.path=null"], "teacher.path", "set teacher.path=<export dir>"),
    ("distill", ["teacher.path=/nonexistent/export"], "teacher.path", "point it at the `export/` directory"),
    ("distill", ["teacher=onnx"], "teacher", "use one of: checkpoint, hf, native"),
    ("distill", ["teacher._target_=distill.nowhere.Teacher"], "teacher._target_", "select one of conf/teacher/"),
    ("distill", ["teacher._target_=distill.models.GPT"], "teacher._target_", "select one of conf/teacher/"),
    ("distill", ["student.n_layers=9"], "student.n_layers", "set student.n_layers between 1 and 4"),
    ("distill", ["student.depth_ratio=1.5"], "student.depth_ratio", "e.g. student.depth_ratio=0.875"),
    ("distill", ["student.num_experts=[4,8,8]"], "student.num_experts", "give 1 expert counts"),
    ("distill", ["student.init=copy"], "student.init", "use one of scratch, teacher"),
    ("distill", ["kd.stop_step=500", "kd.stop_fraction=null", "trainer.max_steps=100"], "kd.stop_step",
     "lower the KD stop step or raise trainer.max_steps"),
    ("distill", ["kd.stop_step=10"], "kd.stop_fraction", "set one of them to null"),
    ("distill", ["kd.temperature=0"], "kd.temperature", "e.g. 1.0"),
    ("distill", ["kd.loss=mse"], "kd.loss", "use one of forward_kl, reverse_kl, jsd"),
    ("distill", [*EP4, "parallel.ep=8"], "parallel.ep", "equal the world size"),
    ("distill", [*MESH4, "teacher.parallel.ep=8"], "teacher.parallel.ep", "equal the world size"),
    ("distill", ["teacher.parallel.ep=1"], "teacher.parallel.ep", "select strategy=mesh"),
    ("pipeline", ["resume=/tmp/step000100.ckpt"], "resume", "use resume=auto"),
    ("pipeline", ["gen_tokens=0"], "gen_tokens", "e.g. gen_tokens=4"),
]


@pytest.mark.parametrize("app, overrides, key, fix", BAD, ids=[" ".join(c[1]) for c in BAD])
def test_bad_input_names_the_key_and_the_fix(app: str, overrides: list[str], key: str, fix: str, teacher: Path):
    if app == "distill" and not any(o.startswith("teacher.path=") for o in overrides):
        overrides = [f"teacher.path={teacher}", *overrides]
    err = config_error(app, overrides)
    assert err.key == key, str(err)
    assert err.fix and fix in err.fix, str(err)
    assert f"config key `{key}`" in str(err) and "\n" not in str(err)


@pytest.mark.parametrize("app, overrides", [
    ("pretrain", []),
    ("pretrain", [*MESH4, "parallel.ep=2"]),  # dp_shard -1: the rest
    ("pretrain", [*MESH4, "parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    ("pretrain", [*MESH4, "trainer.num_nodes=2", "parallel.ep=8", "parallel.ep_intra=4"]),  # 2 nodes x 4
    ("pretrain", [*MESH4, "parallel.ep=2", "parallel.activation_checkpointing=moe_only"]),
    ("pretrain", ["strategy=expert_parallel", "trainer.devices=2"]),  # ep: one node's processes
    ("pretrain", ["strategy=ddp", "trainer.devices=2", "+strategy.find_unused_parameters=true"]),
    ("pretrain", ["resume=never", "model=350m_prmoe32_64"]),
    ("distill", ["kd=full"]),
    ("distill", ["kd=none", "student.n_layers=4", *EP4]),
    ("distill", [*MESH4, "parallel.ep=2", "teacher.parallel.ep=4", "teacher.parallel.dp_shard=1"]),
    ("pipeline", []),
    ("pipeline", ["teacher.path={teacher}", "resume=null"]),
])
def test_good_configs_pass(app: str, overrides: list[str], teacher: Path):
    overrides = [o.replace("{teacher}", str(teacher)) for o in overrides]
    if app == "distill":
        overrides = [f"teacher.path={teacher}", *overrides]
    spec = resolve(composed(app, overrides), app)
    assert spec.app == app and spec.trainer.max_steps >= 1


def swapped(backend: Tokenizer, a: str, b: str) -> Tokenizer:
    """The same tokenizer with the ids of tokens ``a`` and ``b`` exchanged."""
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return Tokenizer.from_str(json.dumps(spec))


def test_teacher_and_data_vocabularies_must_match(tmp_path: Path) -> None:
    ours = TextTokenizer(byte_tokenizer(), EOS_TOKEN, "bytes")
    cfg = ModelConfig.from_dict(dict(name="t", vocab_size=ours.vocab_size, d_model=16, n_layers=2, n_heads=2,
                                 max_seq_len=8, num_experts=[2])).validate()
    same = export_model(GPT(cfg), cfg, tmp_path / "same", tokenizer=ours)
    ExportTeacher(same).check_vocab(ours)  # identical: fine

    other = TextTokenizer(swapped(byte_tokenizer(), "a", "b"), EOS_TOKEN, "bytes")
    differs = export_model(GPT(cfg), cfg, tmp_path / "differs", tokenizer=other)
    with pytest.raises(ConfigError) as err:
        ExportTeacher(differs).check_vocab(ours)
    assert err.value.key == "data.tokenizer" and "about 2 token ids differ" in str(err.value)
    assert f"data.tokenizer.path={differs / 'tokenizer.json'}" in err.value.fix

    small = ModelConfig.from_dict(dict(name="t", vocab_size=200, d_model=16, n_layers=2, n_heads=2, max_seq_len=8,
                                   num_experts=[2])).validate()
    no_tokenizer = export_model(GPT(small), small, tmp_path / "small")
    with pytest.raises(ConfigError) as err:
        ExportTeacher(no_tokenizer).check_vocab(ours)
    assert err.value.key == "data.tokenizer" and "smaller" in str(err.value) and err.value.fix


def test_hydra_errors_exit_2_with_one_line_in_a_real_run(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "distill.pretrain", "trainer.max_steps=abc", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "distill: error: config key `trainer.max_steps`: value 'abc' of type 'str' could not be converted to "
        "Integer; the schema wants an integer. Fix: give it an integer, e.g. trainer.max_steps=300."
    ]
