"""Hugging Face MoE teachers and students: tiny random Mixtral / Qwen2-MoE checkpoints built from configs
(no download) with a locally trained tokenizer, converted both ways, distilled through the real apps.

transformers' own modules are the independent reference: every comparison is against their logits.
"""

from __future__ import annotations

import csv
import json
import re
import string
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MixtralConfig,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
)

from distill.config import register_configs
from distill.errors import ConfigError
from distill.export import load_exported
from distill.interop import (
    export_hf_from_native,
    gpt_from_hf,
    hf_config_from_model,
    hf_family,
    hf_from_gpt,
    model_config_from_hf,
)
from distill.kd import KDSchedule
from distill.models import GPT, ModelConfig
from distill.resolve import resolve
from distill.stage import distill_stage, prepare_data, run_stage
from distill.train.distill_module import DistillModule
from students.config import StudentConfig
from students.mos import derive_student, init_student_from_teacher
from teachers.hf import HFTeacher

CONF = Path(__file__).resolve().parents[1] / "conf"
EOS = "<|endoftext|>"
TOKENIZER_VOCAB = 300

# Mixtral: untied head, vocabulary padded past the tokenizer's (320 > 300), every block MoE, renormalised
# top-2. Qwen2-MoE: tied head, q/k/v biases, dense SwiGLU blocks between MoE blocks (decoder_sparse_step=2),
# no renormalisation (norm_topk_prob=False), a gated shared expert of its own width. Both use GQA.
HF_CONFIGS = {
    "mixtral": lambda vocab=320: MixtralConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=None, eos_token_id=0,
    ),
    "qwen2_moe": lambda vocab=TOKENIZER_VOCAB: Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=40, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=False, qkv_bias=True,
        tie_word_embeddings=True, max_position_embeddings=128, bos_token_id=None, eos_token_id=0,
    ),
}
DATA = ["data=local_text", "data.seq_len=32", "data.batch_size=4", "data.eval_batch_size=8"]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few tens of KB of real text (two standard-library modules), blank-line separated paragraphs."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(Path(m.__file__).read_text() for m in (textwrap, string)))
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(text_file: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on the corpus, wrapped the way Hugging Face checkpoints ship it."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([text_file.read_text()], trainer)
    assert backend.get_vocab_size() == TOKENIZER_VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


@torch.no_grad()
def spread_from_defaults(model: torch.nn.Module) -> torch.nn.Module:
    """Norm gains, biases and routers drawn away from their defaults (a conversion that drops or misplaces
    them shows); routing decisive, with no near-ties between experts."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.uniform_(0.5, 1.5)
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.1)
        elif name.endswith("mlp.gate.weight"):
            p.normal_(0.0, 0.5)
    return model


def build_checkpoint(family: str, out: Path, tokenizer: PreTrainedTokenizerFast, **config_kw) -> Path:
    """A random transformers model saved with `save_pretrained`. Norm gains, biases and routers are drawn
    away from their defaults so that a conversion that drops or misplaces them shows."""
    torch.manual_seed(0)
    model = spread_from_defaults(AutoModelForCausalLM.from_config(HF_CONFIGS[family](**config_kw)))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {f: build_checkpoint(f, root / f, hf_tokenizer) for f in HF_CONFIGS}


def reference(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def compose_cfg(app: str, *overrides: str):
    """The composed config of ``app`` (its out_dir, a Hydra run-time value, set by hand)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name=app, overrides=["out_dir=/nonexistent/out", *overrides])


def random_ids(vocab: int, shape=(2, 24), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ conversion


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_config_conversion_round_trips(family):
    hf_cfg = HF_CONFIGS[family]()
    cfg = model_config_from_hf(hf_cfg)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads) == (32, hf_cfg.num_hidden_layers, 4, 2)
    assert cfg.norm == "rmsnorm" and cfg.moe.dropless and cfg.moe.activation == "swiglu"
    assert cfg.tie_embeddings == hf_cfg.tie_word_embeddings
    if family == "mixtral":
        assert cfg.moe_every == 1 and cfg.moe.renormalize and cfg.num_experts == [4, 4]
    else:
        assert cfg.moe_every == 2 and not cfg.moe.renormalize and cfg.qkv_bias and cfg.num_experts == [4, 4]
        assert (cfg.moe.d_ff, cfg.moe.shared_d_ff, cfg.moe.shared_gate) == (16, 40, True)
    back = hf_config_from_model(cfg, base=hf_cfg)
    assert hf_family(cfg) == back.model_type == family
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads",
                "num_experts_per_tok", "rms_norm_eps", "tie_word_embeddings", "eos_token_id"):
        assert getattr(back, key) == getattr(hf_cfg, key), key


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_converted_teacher_matches_transformers_logits_and_cached_generation(family, checkpoints):
    hf = reference(checkpoints[family])
    ours = gpt_from_hf(hf)
    idx = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, hf(idx).logits, atol=1e-5, rtol=0)
        # grouped-query KV cache: each decoding step's logits equal transformers' over the whole sequence
        out, step_logits = ours.generate(idx[:, :8], max_new_tokens=6, greedy=True, return_logits=True)
        torch.testing.assert_close(step_logits, hf(out).logits[:, 7:-1], atol=1e-5, rtol=0)
    # and back: our weights in a transformers model compute the same
    with torch.no_grad():
        torch.testing.assert_close(hf_from_gpt(ours)(idx).logits, hf(idx).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_student_from_all_teacher_layers_reproduces_teacher(family, checkpoints):
    hf = reference(checkpoints[family])
    teacher_cfg = model_config_from_hf(hf.config)
    s = StudentConfig(n_layers=teacher_cfg.n_layers, init="teacher")
    student = GPT(derive_student(teacher_cfg, s, vocab_size=TOKENIZER_VOCAB)).eval()
    idx = random_ids(TOKENIZER_VOCAB)
    with torch.no_grad():
        want = hf(idx).logits[..., :TOKENIZER_VOCAB]
        assert (student(idx).logits - want).abs().max() > 1e-2  # a fresh student is far off
        init_student_from_teacher(student, HFTeacher(checkpoints[family]).student_init_model(student.cfg), s)
        torch.testing.assert_close(student(idx).logits, want, atol=1e-5, rtol=0)


def test_student_with_fewer_experts_takes_the_first_experts(checkpoints):
    hf = reference(checkpoints["mixtral"])
    s = StudentConfig(n_layers=1, num_experts=[2], init="teacher")
    student = GPT(derive_student(model_config_from_hf(hf.config), s, vocab_size=TOKENIZER_VOCAB))
    assert init_student_from_teacher(student, HFTeacher(checkpoints["mixtral"]).student_init_model(student.cfg), s) == [1]
    moe, ref = student.blocks[0].ffn, hf.model.layers[1].mlp
    torch.testing.assert_close(moe.router.weight, ref.gate.weight[:2], atol=0, rtol=0)
    gate, up = ref.experts.gate_up_proj[:2].transpose(1, 2).chunk(2, dim=2)  # SwiGLU units interleaved in ours
    torch.testing.assert_close(moe.experts.w_in[..., 0::2], gate, atol=0, rtol=0)
    torch.testing.assert_close(moe.experts.w_in[..., 1::2], up, atol=0, rtol=0)
    torch.testing.assert_close(moe.experts.w_out, ref.experts.down_proj[:2].transpose(1, 2), atol=0, rtol=0)
    torch.testing.assert_close(student.wte.weight, hf.model.embed_tokens.weight[:TOKENIZER_VOCAB], atol=0, rtol=0)


def test_unsupported_families_and_students_name_the_key(tmp_path):
    llama = tmp_path / "llama"  # a dense family
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=4).save_pretrained(llama)
    with pytest.raises(ConfigError) as err:
        resolve(compose_cfg("distill", "teacher=hf", f"teacher.path={llama}"), "distill")
    assert err.value.key == "teacher.path" and "llama" in str(err.value)
    with pytest.raises(ConfigError) as err:
        model_config_from_hf(MixtralConfig(num_experts_per_tok=1, num_local_experts=4))
    assert err.value.key == "teacher.path"
    pr_moe = ModelConfig.from_dict(compose_cfg("pretrain", "model=tiny").model).validate()
    with pytest.raises(ConfigError) as err:
        hf_family(pr_moe)  # a residual GELU PR-MoE with LayerNorm: no Hugging Face family
    assert err.value.key == "model.norm"
    mixtral = model_config_from_hf(HF_CONFIGS["mixtral"]())
    with pytest.raises(ConfigError) as err:
        hf_family(replace(mixtral, moe=replace(mixtral.moe, dropless=False)))
    assert err.value.key == "model.moe.dropless"


# ------------------------------------------------------------------------------------------ the pipeline


def test_teacher_source_logits_equal_transformers_with_padding_trimmed(checkpoints, text_file):
    path = checkpoints["mixtral"]
    cfg = compose_cfg("distill", "teacher=hf", f"teacher.path={path}", *DATA, f"data.data_files={text_file}")
    spec = resolve(cfg, "distill")
    assert spec.data.tokenizer.path == str(path.resolve())
    teacher_cfg, ref = spec.teacher.architecture(), spec.teacher.identity().as_dict()
    assert teacher_cfg.vocab_size == 320 and len(ref["sha256"]) == 64
    module = DistillModule(replace(teacher_cfg, vocab_size=TOKENIZER_VOCAB), spec.optim, KDSchedule(spec.kd.cfg, 4),
                           teacher_loader=spec.teacher.load, teacher=ref)
    idx = random_ids(TOKENIZER_VOCAB)
    got = module.teacher_logits(idx)
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())
    with torch.no_grad():
        torch.testing.assert_close(got, reference(path)(idx).logits[..., :TOKENIZER_VOCAB], atol=0, rtol=0)


def test_tokenizer_mismatch_is_a_config_error(checkpoints, hf_tokenizer, text_file, tmp_path):
    from distill.data.tokenizer import byte_tokenizer

    other = tmp_path / "bytes.json"
    byte_tokenizer().save(str(other))
    cfg = compose_cfg("distill", "teacher=hf", f"teacher.path={checkpoints['mixtral']}",
                      "data.tokenizer.kind=pretrained", f"data.tokenizer.path={other}")
    with pytest.raises(ConfigError) as err:
        resolve(cfg, "distill")
    assert err.value.key == "data.tokenizer.path"
    small = build_checkpoint("qwen2_moe", tmp_path / "small", hf_tokenizer, vocab=256)  # 300 tokens, 256 rows
    cfg = compose_cfg("distill", "teacher=hf", f"teacher.path={small}", *DATA, f"data.data_files={text_file}")
    spec = resolve(cfg, "distill")
    with pytest.raises(ConfigError) as err:
        run_stage(spec, distill_stage(spec))
    assert err.value.key == "data.tokenizer"
    with pytest.raises(ConfigError) as err:
        HFTeacher(tmp_path / "missing")
    assert err.value.key == "teacher.path"


def run_app(app: str, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", f"distill.{app}", *overrides], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{app} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def step0(metrics_csv: Path, key: str) -> float:
    with open(metrics_csv) as f:
        return next(float(r[key]) for r in csv.DictReader(f) if r["step"] == "0" and r.get(key))


def first_batch_teacher_ce(path: Path, app: str, *overrides: str) -> float:
    """transformers' own CE on the first training batch the app sees (same data config, same sampler)."""
    dm = prepare_data(resolve(compose_cfg(app, *overrides), app))
    ids = next(iter(dm.train_dataloader()))["input_ids"]
    with torch.no_grad():
        logits = reference(path)(ids[:, :-1]).logits[..., : dm.vocab_size]
    return F.cross_entropy(logits.reshape(-1, dm.vocab_size), ids[:, 1:].reshape(-1)).item()


def check_hf_export(export_dir: Path, out: Path, family: str, tokenizer: PreTrainedTokenizerFast,
                    cli: bool = False) -> None:
    """The distilled student, written as a save_pretrained dir (by the function or its command line),
    reloads in transformers with our logits and the teacher's tokenizer."""
    student, cfg = load_exported(export_dir)
    if cli:
        proc = subprocess.run([sys.executable, "-m", "students.hf", str(export_dir), str(out)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        export_hf_from_native(export_dir, out)
    hf = reference(out)
    assert hf.config.model_type == family and hf.config.num_hidden_layers == cfg.n_layers
    idx = random_ids(cfg.vocab_size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, student.eval()(idx).logits, atol=1e-5, rtol=0)
    sample = "def wrap(text, width=70):"
    assert AutoTokenizer.from_pretrained(out).encode(sample) == tokenizer.encode(sample)


def test_distill_app_mixtral_teacher(checkpoints, text_file, hf_tokenizer, tmp_path):
    path = checkpoints["mixtral"]
    overrides = ["teacher=hf", f"teacher.path={path}", *DATA, f"data.data_files={text_file}",
                 "student.n_layers=2", "student.init=teacher"]
    run_app("distill", *overrides, "trainer=smoke", "logger=csv", f"hydra.run.dir={tmp_path}")
    metrics = tmp_path / "csv" / "metrics.csv"
    teacher_ce = first_batch_teacher_ce(path, "distill", *overrides)
    assert step0(metrics, "teacher/ce") == pytest.approx(teacher_ce, rel=1e-5)
    # a student initialised from all the teacher's layers starts exactly where the teacher is
    assert step0(metrics, "train/ce") == pytest.approx(teacher_ce, rel=1e-5)
    assert step0(metrics, "kd/active") == 1.0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["distill"]["teacher"]["path"] == str(path.resolve())
    check_hf_export(tmp_path / "export", tmp_path / "hf", "mixtral", hf_tokenizer)


def test_distill_app_hf_teacher_importance_selection_and_router_kd(checkpoints, text_file, tmp_path):
    """A Hugging Face teacher: a student with half its experts, chosen by importance on calibration batches,
    trained with router KD (the teacher then runs as our GPT)."""
    path = checkpoints["mixtral"]
    run = run_app("distill", "teacher=hf", f"teacher.path={path}", *DATA, f"data.data_files={text_file}",
                  "student.n_layers=2", "student.init=teacher", "student.num_experts=[2,2]",
                  "student.expert_selection=importance", "student.calibration_batches=2", "kd.router_weight=0.5",
                  "trainer=smoke", "trainer.max_steps=2", "logger=none", f"hydra.run.dir={tmp_path}")
    out = run.stdout + run.stderr
    kept = re.findall(r"student block (\d): teacher block (\d)'s experts \[(\d), (\d)\] \(importance\)", out)
    assert sorted(b for b, *_ in kept) == ["0", "1"], out[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert rows[0]["router_kd"] > 0 and rows[0]["kd"] > 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["distill"]["expert_maps"] == {i: [int(a), int(b)] for i, (_, _, a, b) in enumerate(sorted(kept))}


def test_pipeline_app_qwen2_moe_teacher_skips_pretraining(checkpoints, text_file, hf_tokenizer, tmp_path):
    path = checkpoints["qwen2_moe"]
    overrides = ["teacher=hf", f"teacher.path={path}", *DATA, f"data.data_files={text_file}",
                 "student.n_layers=2", "student.init=teacher"]
    run_app("pipeline", *overrides, "trainer=smoke", "trainer.max_steps=8", "logger=csv", "gen_tokens=4",
            f"hydra.run.dir={tmp_path}")
    assert not (tmp_path / "teacher").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student_staged_kd", "student_no_kd", "student_full_kd"}
    assert report["models"]["teacher"]["gen_tokens_per_s"] > 0
    metrics = tmp_path / "student_staged_kd" / "csv" / "metrics.csv"
    teacher_ce = first_batch_teacher_ce(path, "pipeline", *overrides)
    assert step0(metrics, "teacher/ce") == pytest.approx(teacher_ce, rel=1e-5)
    check_hf_export(tmp_path / "student_staged_kd" / "export", tmp_path / "hf", "qwen2_moe", hf_tokenizer,
                    cli=True)
