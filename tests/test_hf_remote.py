"""Students that load anywhere: our PR-MoE exported with its own modeling code, loaded by transformers with
`trust_remote_code`, computes what our GPT computes (logits, greedy generation with a KV cache, padded batches).

Our GPT is the reference: every comparison is against its logits, or a naive greedy loop over it.
"""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM

import distill.hf_remote.export as remote
from distill.errors import ConfigError
from distill.export import export_model
from distill.hf_remote import export_anywhere, export_remote
from distill.models import GPT, ModelConfig

EOS = "<|endoftext|>"
VOCAB = 300
# tiny.yaml shrunk: residual PR-MoE, a pyramid (2 then 4 experts) every 2nd block, capacity with drops
PR_MOE = dict(name="tiny_pr", vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, moe_every=2,
              num_experts=[2, 4], moe=dict(top_k=1, residual=True, eval_capacity_factor=1.0, min_capacity=1))
# the other options the shipped code covers: RMSNorm, GQA, SwiGLU, untied head, no biases but q/k/v, top-2
# sigmoid routing, a gated shared expert, the balancing bias, a dense layer inside the MoE rule
LLAMA_LIKE = dict(name="tiny_llama", vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64,
                  moe_every=1, num_experts=[4, 4, 8], dense_layers=[1], norm="rmsnorm", bias=False, attn_bias=True,
                  mlp_activation="swiglu", tie_embeddings=False,
                  moe=dict(top_k=2, activation="swiglu", score_func="sigmoid", num_shared_experts=1, shared_gate=True,
                           aux_free_bias=True, dropless=True))


def gpt(spec: dict, seed: int = 0, **moe: object) -> GPT:
    cfg = ModelConfig.from_dict({**spec, "moe": {**spec["moe"], **moe}}).validate()
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    for layer in model.moe_layers:  # a balancing bias that changes choices
        if layer.router.balance_bias is not None:
            layer.router.balance_bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = ["def forward(self, x):\n    return self.proj(x) + x  # residual\n"] * 20
    backend.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return backend


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


def naive_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence again at every step."""
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, model(idx).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("spec", [PR_MOE, LLAMA_LIKE], ids=["pr_moe", "llama_like"])
def test_remote_logits_equal_gpt(spec: dict, tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = gpt(spec)
    out = export_remote(model, tmp_path / "hf", tokenizer)
    shipped = Path(remote.__file__).parent
    for name in ("configuration_distill.py", "modeling_distill.py"):  # copied verbatim, self-contained
        assert filecmp.cmp(out / name, shipped / name, shallow=False)
        imports = [ln for ln in (out / name).read_text().splitlines() if ln.startswith(("import ", "from "))]
        assert not [ln for ln in imports if "distill" in ln.split()[1].split(".")[0]], imports
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_distill.DistillMoEForCausalLM"
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    hf = load(out)
    idx = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    if spec is PR_MOE:  # the capacity applies: some tokens are dropped, the same ones
        assert max(s.drop_fraction.item() for s in ours.moe_stats) > 0
    torch.testing.assert_close(theirs, ours.logits, atol=1e-5, rtol=0)


def test_remote_generate_with_cache_equals_naive_loop(tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = gpt(PR_MOE, seed=3, dropless=True)  # per-call capacity would differ between cached and uncached calls
    hf = load(export_remote(model, tmp_path / "hf", tokenizer))
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    n = 12
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(got, naive_greedy(model, prompt, n))
    # a left-padded batch: each row as if alone (positions count real tokens, padding keys are masked)
    short = prompt[1:, 2:]
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(short)], dim=1)
    with torch.no_grad():
        logits = hf(torch.cat([prompt[:1], padded]), attention_mask=torch.cat([torch.ones(1, 6, dtype=torch.long), mask])).logits
    torch.testing.assert_close(logits[1, 2:], model(short).logits[0], atol=1e-5, rtol=0)


def test_remote_loads_without_distill(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """The directory is all a machine without `distill` needs (importing distill fails in the child)."""
    model = gpt(PR_MOE, seed=4)
    out = export_remote(model, tmp_path / "hf", tokenizer)
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.save({"idx": idx, "logits": model(idx).logits}, tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["distill"] = None  # `import distill` raises ImportError
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert tok.eos_token == {EOS!r} and tok.pad_token == {EOS!r}
        with torch.no_grad():
            torch.testing.assert_close(m(ref["idx"]).logits, ref["logits"], atol=1e-5, rtol=0)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_missing_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    model = gpt(PR_MOE)
    with pytest.raises(ConfigError) as err:
        export_remote(model, tmp_path / "hf", None)
    assert err.value.key == "tokenizer"
    native = export_model(model, model.cfg, tmp_path / "export")  # no tokenizer.json beside it
    with pytest.raises(ConfigError) as err:
        export_remote(native, tmp_path / "hf", key="eval.tokenizer")
    assert err.value.key == "eval.tokenizer"
    assert not (tmp_path / "hf").exists()


def test_uncovered_option_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer,
                                             tmp_path: Path) -> None:
    """An option the shipped code does not implement is refused, naming its key (a field it does not know is
    accepted only at its default)."""
    monkeypatch.setattr(remote, "MODEL_KEYS", remote.MODEL_KEYS - {"bias"})
    remote.check_remote_covers(gpt(PR_MOE).cfg)  # bias at its default (true): accepted
    with pytest.raises(ConfigError) as err:
        export_remote(gpt({**PR_MOE, "bias": False}), tmp_path / "hf", tokenizer)
    assert err.value.key == "model.bias"


def test_export_anywhere_prefers_a_family(tokenizer: Tokenizer, tmp_path: Path) -> None:
    mixtral = dict(LLAMA_LIKE, num_experts=[4, 4, 4, 4], dense_layers=[], attn_bias=False,
                   moe=dict(top_k=2, activation="swiglu", dropless=True))
    model = gpt(mixtral)
    out, kind = export_anywhere(model, tmp_path / "mixtral", tokenizer)
    assert kind == "family" and json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    assert not (out / "modeling_distill.py").exists()
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # no remote code
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx).logits, atol=1e-5, rtol=0)
    assert export_anywhere(gpt(PR_MOE), tmp_path / "pr", tokenizer)[1] == "remote"


@pytest.mark.parametrize("option,key", [({"qk_norm": "head"}, "model.qk_norm"), ({"attn_sinks": True}, "model.attn_sinks"),
                                        ({"moe": {**PR_MOE.get("moe", {}), "routed_scaling_factor": 2.5}},
                                         "model.moe.routed_scaling_factor")])
def test_family_options_the_shipped_code_lacks_are_refused(option: dict, key: str, tokenizer: Tokenizer,
                                                           tmp_path: Path) -> None:
    """Options the Hugging Face families brought (q/k norm, sinks, DeepSeek routing) are not in the shipped
    modeling code: refused by name, nothing written."""
    with pytest.raises(ConfigError) as err:
        export_remote(gpt({**PR_MOE, **option}), tmp_path / "hf", tokenizer)
    assert err.value.key == key and not (tmp_path / "hf").exists()
