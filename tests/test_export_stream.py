"""Streamed exports: the safetensors writer against `save_file`, `export_model` against `save_model`, the
Hugging Face export against transformers' `save_pretrained`, and (slow) the exports of a model laid out by
`parallelize` on 2 gloo ranks (ep=2, dp_shard=2) against those of the same model unsharded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from export_stream_worker import model_config, reference_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

from distill.export import export_model, load_exported, write_weights
from distill.interop import export_hf, export_hf_from_native, hf_from_gpt, model_config_from_hf
from distill.parallel.launch import run_ranks
from distill.safetensors_stream import (
    SafetensorsWriter,
    header_bytes,
    save_order,
    stream_save,
    write_gathered,
)

ROOT = Path(__file__).resolve().parents[1]


def random_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(5, 3, generator=g).bfloat16(), "w.f16": torch.randn(7, generator=g).half(),
        "a.f32": torch.randn(2, 3, 4, generator=g), "a.f64": torch.randn(3, generator=g).double(),
        "i64": torch.randint(-9, 9, (4, 2), generator=g), "i32": torch.arange(5, dtype=torch.int32),
        "u8": torch.randint(0, 255, (6,), generator=g, dtype=torch.uint8), "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "mask": torch.rand(3, 3, generator=g) > 0.5, "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
        "é-unicode": torch.ones(1), "view": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_writer_gives_save_files_bytes(tmp_path, metadata):
    tensors = random_tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata=metadata)
    entries = save_order((k, v.shape, v.dtype) for k, v in tensors.items())
    stream_save(tmp_path / "ours.safetensors", entries, (tensors[n] for n, _, _ in entries), metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert_same_tensors(load_file(tmp_path / "ours.safetensors"), tensors)


def test_writer_any_order_loads_and_header_is_aligned(tmp_path):
    tensors = random_tensors()
    entries = [(k, v.shape, v.dtype) for k, v in reversed(tensors.items())]  # not save_file's order
    path = stream_save(tmp_path / "t.safetensors", entries, (tensors[n] for n, _, _ in entries), {"a": "1", "b": "2"})
    assert_same_tensors(load_file(path), tensors)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"a": "1", "b": "2"}
        assert torch.equal(f.get_slice("a.f32")[1:], tensors["a.f32"][1:])
    head = header_bytes(entries, {"a": "1"})
    assert (len(head) - 8) % 8 == 0 and int.from_bytes(head[:8], "little") == len(head) - 8


def test_writer_rejects_what_the_header_does_not_say(tmp_path):
    entries = [("a", (2, 3), torch.float32), ("b", (4,), torch.int64)]
    with pytest.raises(ValueError, match="expected tensor #0"):
        with SafetensorsWriter(tmp_path / "x", entries) as w:
            w.write("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="expected tensor #1"):
        with SafetensorsWriter(tmp_path / "x", entries) as w:
            w.write("a", torch.zeros(2, 3))
            w.write("b", torch.zeros(4))  # float, not int64
    with pytest.raises(ValueError, match="never written"):
        with SafetensorsWriter(tmp_path / "x", entries) as w:
            w.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="twice"):
        header_bytes(entries + [("a", (1,), torch.float32)])


def test_a_failing_writer_still_takes_part_in_every_gather(tmp_path):
    entries = [(f"t{i}", (2,), torch.float32) for i in range(3)]
    seen = []

    def sources():
        for i in range(3):
            seen.append(i)  # stands for a collective every rank enters
            yield torch.zeros(2), (lambda t, i=i: [(f"t{i}", t)])

    with pytest.raises(FileNotFoundError):
        write_gathered(tmp_path / "missing" / "x.safetensors", entries, sources())
    assert seen == [0, 1, 2]
    seen.clear()
    with pytest.raises(ValueError, match="expected tensor #0"):
        write_gathered(tmp_path / "x.safetensors", entries[::-1], sources())
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_model_writes_save_models_bytes(tmp_path, tied, dtype):
    from dataclasses import replace

    cfg = replace(model_config(), tie_embeddings=tied)
    model = reference_model(cfg).to(dtype)
    save_model(model, str(tmp_path / "ref.safetensors"))
    write_weights(model, tmp_path / "ours.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        assert ("wte.weight" in f.keys()) != tied and ("lm_head.weight" in f.keys())
    out = export_model(model, cfg, tmp_path / "export", meta={"k": 1})
    loaded, cfg2 = load_exported(out)
    assert cfg2 == cfg and json.loads((out / "config.json").read_text())["meta"] == {"k": 1}
    assert_same_tensors(loaded.to(dtype).state_dict(), model.state_dict())
    assert (loaded.lm_head.weight is loaded.wte.weight) == tied
    assert not list(tmp_path.glob(".export.tmp-*"))
    # a rank that is not the writer only takes part in the gathers: it writes nothing
    assert export_model(model, cfg, tmp_path / "other", writer=False) == tmp_path / "other"
    assert not (tmp_path / "other").exists()


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits


def mixtral_config():
    from transformers import MixtralConfig

    return model_config_from_hf(MixtralConfig(
        vocab_size=80, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_export_hf_equals_save_pretrained(tmp_path, family):
    cfg = model_config() if family == "qwen2_moe" else mixtral_config()
    model = reference_model(cfg)
    hf_from_gpt(model).save_pretrained(tmp_path / "ref")  # the whole-model path: transformers writes
    export_hf(model, tmp_path / "ours")
    ref, ours = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert_same_tensors(ours, ref)
    assert any(".experts.0." in k for k in ours)  # the hub's per-expert layout
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "ours" / name).read_text()) == json.loads((tmp_path / "ref" / name).read_text())
    ids = torch.randint(cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "ours", ids), model(ids).logits, atol=1e-5, rtol=0)


def test_export_hf_from_native_reads_tensor_by_tensor(tmp_path, monkeypatch):
    import distill.export

    cfg = model_config()
    model = reference_model(cfg)
    src = export_model(model, cfg, tmp_path / "native")
    monkeypatch.setattr(distill.export, "load_exported", lambda *a, **k: pytest.fail("loaded the whole model"))
    export_hf_from_native(src, tmp_path / "hf")
    export_hf(model, tmp_path / "direct")
    assert_same_tensors(load_file(tmp_path / "hf" / "model.safetensors"),
                        load_file(tmp_path / "direct" / "model.safetensors"))
    ids = torch.randint(cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sharded_exports_equal_unsharded(tmp_path):
    layouts = ["ep=2", "dp_shard=2"]
    cmd = [sys.executable, str(ROOT / "tests" / "export_stream_worker.py"), str(tmp_path), ";".join(layouts)]
    for rank, (code, out) in enumerate(run_ranks(cmd, 2, timeout=240, cwd=ROOT)):
        assert code == 0, f"rank {rank} {'was killed at the timeout' if code == -9 else f'exited {code}'}:\n{out[-4000:]}"
    ref = tmp_path / "ref"
    for layout in ("ep2", "dp_shard2"):
        infos = [json.loads((tmp_path / f"{layout}-rank{r}.json").read_text()) for r in range(2)]
        assert all(i["tied"] for i in infos) and "blocks.1.ffn.experts.w_in" in infos[0]["sharded"]
        assert len(infos[0]["sharded"]) > 10  # the parameters really were sharded
        got = tmp_path / layout
        # the same bytes as the unsharded export, the same config
        assert (got / "native" / "model.safetensors").read_bytes() == (ref / "native" / "model.safetensors").read_bytes()
        assert (got / "native" / "config.json").read_text() == (ref / "native" / "config.json").read_text()
        assert_same_tensors(load_file(got / "hf" / "model.safetensors"), load_file(ref / "hf" / "model.safetensors"))
        assert (got / "hf" / "config.json").read_text() == (ref / "hf" / "config.json").read_text()
    model, cfg = load_exported(tmp_path / "dp_shard2" / "native")
    assert_same_tensors(model.state_dict(), reference_model(cfg).state_dict())
    ids = torch.randint(cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "ep2" / "hf", ids), model(ids).logits, atol=1e-5, rtol=0)
