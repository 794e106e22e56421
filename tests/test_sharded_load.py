"""Sharded teachers (distill/parallel/load.py, `TeacherSource.load_sharded`): built on the meta device, laid out
on a device mesh, each rank reading only its slices of the safetensors files.

The multi-process check starts one subprocess per rank (tests/sharded_load_worker.py) on gloo, hard-killed
after a timeout; the references are the teachers loaded whole (for Hugging Face: transformers' own model).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hf import spread_from_defaults
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

from distill.errors import ConfigError
from distill.export import export_model
from distill.interop import gpt_from_hf
from distill.models import GPT, ModelConfig
from distill.models.fused import FUSED_LAYOUT
from distill.moe import MoEConfig
from distill.parallel.launch import run_ranks
from distill.parallel.load import Cat, Loaded, SafetensorsFiles, Stack, Transposed, load_sharded_
from teachers.base import TeacherLoader
from teachers.hf import HFTeacher
from teachers.native import ExportTeacher

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "sharded_load_worker.py"
LAYOUTS = ["ep=4", "dp_shard=2,ep=2", "tp=2,dp_shard=2"]
TOL = 1e-5


def native_export(out: Path) -> Path:
    """Tied embeddings, a persistent buffer (aux-free bias, drawn away from zero), a layer with fewer experts
    (2) than ep=4 (a sub-group, replicated)."""
    cfg = ModelConfig(name="t", vocab_size=256, d_model=32, n_layers=4, n_heads=2, max_seq_len=32,
                      num_experts=[4, 2], moe=MoEConfig(top_k=1, dropless=True, aux_free_bias=True)).validate()
    torch.manual_seed(0)
    model = GPT(cfg)
    for layer in model.moe_layers:
        layer.router.balance_bias.normal_(0.0, 0.1)
    return export_model(model, cfg, out)


def hf_checkpoint(family: str, out: Path) -> Path:
    """A random tiny transformers model: Mixtral (untied head, saved in several shards with an index) or
    Qwen2-MoE (tied, q/k/v biases, dense blocks between MoE blocks, a shared expert; one file)."""
    common = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                  max_position_embeddings=64, bos_token_id=None, eos_token_id=0)
    if family == "mixtral":
        config = MixtralConfig(vocab_size=320, intermediate_size=48, num_hidden_layers=2, num_local_experts=4,
                               **common)
    else:
        config = Qwen2MoeConfig(vocab_size=300, intermediate_size=48, moe_intermediate_size=16,
                                shared_expert_intermediate_size=40, num_hidden_layers=4, num_experts=4,
                                decoder_sparse_step=2, norm_topk_prob=False, qkv_bias=True,
                                tie_word_embeddings=True, **common)
    torch.manual_seed(0)
    model = spread_from_defaults(AutoModelForCausalLM.from_config(config))
    model.save_pretrained(out, max_shard_size="40KB" if family == "mixtral" else "50MB")
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    native = native_export(root / "native")
    ckpt = root / "t.ckpt"  # what CheckpointTeacher reads of a Lightning checkpoint
    torch.save({"state_dict": {f"model.{k}": v for k, v in ExportTeacher(native).load().state_dict().items()},
                "hyper_parameters": {"model_cfg": json.loads((native / "config.json").read_text())["model"]},
                "fused_layout": FUSED_LAYOUT}, ckpt)
    return {"native": native, "checkpoint": ckpt, "mixtral": hf_checkpoint("mixtral", root / "mixtral"),
            "qwen2_moe": hf_checkpoint("qwen2_moe", root / "qwen2_moe")}


# ---------------------------------------------------------------------------------------------- one process


def test_hf_files_are_stored_per_expert_and_convert_region_by_region(teachers):
    """The files hold one tensor per expert (and Mixtral's several shards an index); the lazy conversion, read
    whole or region by region, equals transformers' model converted in memory."""
    for family in ("mixtral", "qwen2_moe"):
        path = teachers[family]
        keys = set().union(*(load_file(f).keys() for f in path.glob("*.safetensors")))
        assert any(".experts.0." in k for k in keys) and not any(k.endswith("gate_up_proj") for k in keys)
        assert (path / "model.safetensors.index.json").is_file() == (family == "mixtral")
        source = HFTeacher(path)
        source.verify()
        expect = gpt_from_hf(source.load().hf).state_dict()
        lazy = source.sharded_tensors()
        for name, want in expect.items():
            assert torch.equal(lazy[name].read(tuple(slice(0, n) for n in want.shape)), want), name
            if want.dim() == 3:  # experts: a corner region crossing the [gate | up] seam
                index = (slice(1, 3), slice(4, 20), slice(want.shape[2] // 2 - 3, want.shape[2] // 2 + 5))
                assert torch.equal(lazy[name].read(index), want[index]), name


def test_lazy_tensors_read_only_their_region(tmp_path):
    file = tmp_path / "x.safetensors"
    a, b = torch.randn(3, 4, 6), torch.randn(3, 2, 6)
    save_file({"a": a, "b": b}, str(file))
    files = SafetensorsFiles([file])
    cat = Transposed(Cat([files.tensor("a"), files.tensor("b")], dim=1), 1, 2)
    index = (slice(1, 3), slice(2, 5), slice(3, 6))
    assert torch.equal(cat.read(index), torch.cat([a, b], 1).transpose(1, 2)[index])
    assert files.elements_read == 2 * 3 * 3  # rows 3:6 of [a | b]: one row of a, two of b (per expert, 3 cols)
    stack = Stack([Loaded(a[i]) for i in range(3)])
    assert torch.equal(stack.read((slice(2, 3), slice(0, 4), slice(1, 2))), a[2:3, :, 1:2])
    assert stack.read((slice(1, 1), slice(0, 4), slice(0, 6))).shape == (0, 4, 6)


def test_load_sharded_fills_a_plain_module_and_zeroes_nonpersistent_buffers(teachers):
    source = ExportTeacher(teachers["native"])
    reference = source.load()
    model = GPT(source.architecture())
    for layer in model.moe_layers:
        layer.router.balance_counts.fill_(7.0)
    tensors = source.sharded_tensors()
    load_sharded_(model, lambda name, index: tensors[name].read(index))
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert all(layer.router.balance_counts.abs().sum() == 0 for layer in model.moe_layers)
    assert TeacherLoader(source)().training is False


@pytest.mark.parametrize("kind", ["native", "mixtral"])
def test_truncated_or_missing_weights_file_is_a_config_error_before_any_collective(teachers, tmp_path, kind):
    import shutil

    copy = tmp_path / kind
    shutil.copytree(teachers[kind], copy)
    victim = sorted(copy.glob("*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-16])  # the header says the data is longer than the file
    source = ExportTeacher(copy) if kind == "native" else HFTeacher(copy)
    for call in (source.verify, lambda: source.load_sharded(torch.float32, mesh=None)):
        with pytest.raises(ConfigError, match="complete safetensors file|not a readable") as err:
            call()
        assert err.value.key == "teacher.path" and victim.name in str(err.value)
    if kind == "mixtral":
        victim.unlink()
        for call in (source.verify, lambda: source.load_sharded(torch.float32, mesh=None)):
            with pytest.raises(ConfigError, match="missing") as err:
                call()
            assert victim.name in str(err.value)


# ---------------------------------------------------------------------------------------------- four ranks


@pytest.mark.slow
def test_sharded_teachers_equal_whole_ones_and_each_rank_reads_a_quarter(teachers, tmp_path):
    specs = ";".join([*(f"{k}={p}" for k, p in teachers.items()), f"native@bf16={teachers['native']}"])
    cmd = [sys.executable, str(WORKER), str(tmp_path), ";".join(LAYOUTS), specs]
    results = run_ranks(cmd, 4, timeout=240, cwd=ROOT)
    for rank, (code, out) in enumerate(results):
        what = "was killed at the timeout" if code == -9 else f"exited {code}"
        assert code == 0, f"rank {rank} {what}:\n{out[-4000:]}"
    runs: dict[tuple[str, str], list[dict]] = {}
    for file in sorted(tmp_path.glob("*-rank*.json")):
        r = json.loads(file.read_text())
        runs.setdefault((r["layout"], file.name.split("-")[1]), []).append(r)
    assert len(runs) == len(LAYOUTS) * 5 and all(len(v) == 4 for v in runs.values())
    for (layout, kind), ranks in runs.items():
        bf16 = kind.endswith("@bf16")
        for r in ranks:
            where = f"{layout} {kind} rank {r['rank']}"
            assert r["logits_diff"] <= (1e-2 if bf16 else TOL), where  # bf16: vs the whole teacher in bf16
            assert r["shapes_ok"] and max(r["param_diff"].values()) == 0.0, (where, r["param_diff"])
            assert all(v == 0.0 for v in r["buffer_diff"].values()), where
            assert all(v == 0.0 for v in r["nonpersistent_max"].values()), where
            assert r["frozen"] and r["dtypes"] == [r["dtype"]], where
            assert r["tied"] == (kind != "mixtral"), where
            if kind == "checkpoint":
                continue  # memory-mapped: indexing touches only the region's pages (not counted here)
            # this rank's share: about a quarter of what the files hold (uneven splits of small tensors)
            assert 0.2 * r["total"] <= r["read"] <= 0.3 * r["total"], (where, r["read"], r["total"])
            assert r["read"] <= r["local"] + 16, where  # no more than its regions (+ persistent buffers)
        # each element once (those a tensor-parallel group keeps whole: once per rank of the group)
        tp = int(layout.split("tp=")[1].split(",")[0]) if "tp=" in layout else 1
        assert sum(r["read"] for r in ranks) <= ranks[0]["total"] + (tp - 1) * ranks[0]["tp_whole"] + 4 * 16, layout
