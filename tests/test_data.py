"""Data pipeline: hashed splits, tokenizers, packing, caching, bad input, distributed sampling.

Tiny corpora written to tmp dirs; one test reads a small slice of the stdlib corpus. No network.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import datasets  # noqa: E402
from tokenizers import Tokenizer, pre_tokenizers  # noqa: E402

from distill.data import (  # noqa: E402
    DataConfig,
    LMDataModule,
    TokenizerConfig,
    build_corpus,
    build_tokenizer,
    format_stats,
    iter_blocks,
    pack_corpus,
    tokenize_corpus,
)
from distill.data import corpus as corpus_mod  # noqa: E402
from distill.data import packing as packing_mod  # noqa: E402
from distill.data import tokenizer as tokenizer_mod  # noqa: E402
from distill.data.corpus import decode_utf8, split_of, stdlib_files  # noqa: E402
from distill.data.tokenizer import byte_symbols  # noqa: E402
from distill.errors import ConfigError, exit_on_config_error  # noqa: E402

WORDS = "the of and a to in is was for on that with as by at from it an be this are def return class if else".split()


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub access is never needed: force offline even if datasets was imported before this module."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def write_lines(path: Path, n: int, seed: int = 0) -> list[str]:
    """A text file of n distinct lines (one document each with the text builder's default)."""
    rng = random.Random(seed)
    lines = [
        f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + " é€" for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def text_cfg(tmp_path: Path, n: int = 300, **overrides) -> DataConfig:
    """An hf/text config over a fresh file of n lines, bytes tokenizer, its own cache dir."""
    data = tmp_path / "corpus.txt"
    if not data.exists():
        write_lines(data, n)
    cfg = DataConfig(
        source="hf",
        path="text",
        data_files=str(data),
        val_fraction=0.2,
        test_fraction=0.2,
        tokenizer=TokenizerConfig(kind="bytes"),
        seq_len=15,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def counting(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[int]:
    """Wrap module.name so that calls are counted; returns the one-element counter."""
    calls = [0]
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


# --- splits ---------------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete(tmp_path: Path) -> None:
    cfg = text_cfg(tmp_path)
    lines = set((tmp_path / "corpus.txt").read_text().splitlines())
    first = build_corpus(cfg)
    again = build_corpus(text_cfg(tmp_path, cache_dir=str(tmp_path / "other-cache")))  # recomputed
    split_texts = {s: first[s]["text"] for s in first}
    assert split_texts == {s: again[s]["text"] for s in again}
    sets = [set(split_texts[s]) for s in ("train", "validation", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sets[0] | sets[1] | sets[2] == lines
    assert 30 < len(sets[1]) < 90 and 30 < len(sets[2]) < 90  # 0.2 of 300, far from 0 or all
    # documents keep the file's order within a split
    order = (tmp_path / "corpus.txt").read_text().splitlines()
    assert split_texts["train"] == [t for t in order if t in sets[0]]

    reseeded = build_corpus(text_cfg(tmp_path, split_seed=1))
    assert set(reseeded["validation"]["text"]) != sets[1]
    assert (
        set(reseeded["train"]["text"]) | set(reseeded["validation"]["text"]) | set(reseeded["test"]["text"])
        == lines
    )


def test_split_of_fractions_and_salt() -> None:
    keys = [f"pkg/module_{i}.py" for i in range(20_000)]
    splits = [split_of(k, 0, 0.1, 0.05) for k in keys]
    assert abs(splits.count("validation") / len(keys) - 0.1) < 0.01
    assert abs(splits.count("test") / len(keys) - 0.05) < 0.01
    assert splits == [split_of(k, 0, 0.1, 0.05) for k in keys]
    assert splits != [split_of(k, 1, 0.1, 0.05) for k in keys]


# --- packing --------------------------------------------------------------------------------------------


def test_iter_blocks_matches_naive_chunking() -> None:
    rng = np.random.default_rng(0)
    for block_len in (1, 7, 129):
        chunks = [rng.integers(0, 1000, rng.integers(0, 300)).astype(np.int32) for _ in range(40)]
        stream = np.concatenate(chunks)
        expected = [stream[i : i + block_len] for i in range(0, len(stream) - block_len + 1, block_len)]
        got = list(iter_blocks(chunks, block_len))
        assert len(got) == len(stream) // block_len
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))


def test_packed_blocks_equal_naive_byte_stream(tmp_path: Path) -> None:
    """bytes tokenizer: the reference stream is each document's UTF-8 bytes followed by 256 (end-of-text)."""
    cfg = text_cfg(tmp_path)
    corpus = build_corpus(cfg)
    tok = build_tokenizer(cfg, corpus)
    tokens = tokenize_corpus(corpus, tok)
    blocks = pack_corpus(tokens, cfg.seq_len, tmp_path / "cache" / "datasets")
    block_len = cfg.seq_len + 1
    for split in ("train", "validation", "test"):
        stream: list[int] = []
        for text in corpus[split]["text"]:
            stream += [*text.encode("utf-8"), 256]
        n = len(stream) // block_len
        expected = np.array(stream[: n * block_len]).reshape(n, block_len)
        got = np.array(blocks[split]["input_ids"])
        assert got.shape == (n, block_len)
        np.testing.assert_array_equal(got, expected)  # nothing lost, duplicated or reordered
        assert (got == 256).sum() == stream[: n * block_len].count(256) > 0


# --- tokenizers -----------------------------------------------------------------------------------------

SAMPLES = ["def f(x):\n\treturn x  # ok", "naïve café — 日本語 🙂", "  spaces  ", "a<|endoftext|>b", ""]


def test_bytes_tokenizer_is_utf8(tmp_path: Path) -> None:
    assert set(byte_symbols()) == set(pre_tokenizers.ByteLevel.alphabet())
    tok = build_tokenizer(DataConfig(tokenizer=TokenizerConfig(kind="bytes")), corpus=None)
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    for text in SAMPLES:
        assert tok.encode(text) == list(text.encode("utf-8"))  # the literal "<|endoftext|>" stays text
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([104, 105, 256]) == "hi<|endoftext|>"
    reloaded = Tokenizer.from_file(str(tok.save(tmp_path / "tok")))
    assert reloaded.encode(SAMPLES[1], add_special_tokens=False).ids == tok.encode(SAMPLES[1])


def test_bpe_round_trip_and_save(tmp_path: Path) -> None:
    cfg = text_cfg(tmp_path, tokenizer=TokenizerConfig(kind="bpe", vocab_size=300))
    tok = build_tokenizer(cfg, build_corpus(cfg))
    assert tok.eos_id == 0 and 257 <= tok.vocab_size <= 300
    line = (tmp_path / "corpus.txt").read_text().splitlines()[0]
    assert len(tok.encode(line)) < len(line.encode())  # merges learnt from the corpus compress it
    for text in [*SAMPLES, line]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a<|endoftext|>b").count(tok.eos_id) == 0
    reloaded = Tokenizer.from_file(str(tok.save(tmp_path / "tok")))
    for text in SAMPLES[:3]:
        assert reloaded.encode(text, add_special_tokens=False).ids == tok.encode(text)


def test_pretrained_file_and_save_pretrained_dir(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    cfg = text_cfg(tmp_path, tokenizer=TokenizerConfig(kind="bpe", vocab_size=300))
    bpe = build_tokenizer(cfg, build_corpus(cfg))
    file = bpe.save(tmp_path / "plain")
    hf_dir = tmp_path / "hf"
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(file)), eos_token="</s>")
    hf.add_special_tokens({"eos_token": "</s>"})
    hf.save_pretrained(str(hf_dir))

    from_file = build_tokenizer(
        DataConfig(tokenizer=TokenizerConfig(kind="pretrained", path=str(file))), None
    )
    from_dir = build_tokenizer(
        DataConfig(tokenizer=TokenizerConfig(kind="pretrained", path=str(hf_dir))), None
    )
    assert from_file.fingerprint == bpe.fingerprint and from_file.eos_token == "<|endoftext|>"
    assert from_dir.eos_token == "</s>" and from_dir.eos_id == hf.eos_token_id == 300
    assert from_dir.vocab_size == 301 and from_dir.fingerprint != bpe.fingerprint
    for text in SAMPLES:
        assert from_file.encode(text) == from_dir.encode(text) == bpe.encode(text)
        assert from_dir.decode(from_dir.encode(text)) == text
    assert from_dir.encode(SAMPLES[0]) == hf(SAMPLES[0], add_special_tokens=False)["input_ids"]


# --- caching --------------------------------------------------------------------------------------------


def test_second_build_does_no_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = text_cfg(tmp_path, tokenizer=TokenizerConfig(kind="bpe", vocab_size=300))
    work = {
        "split": counting(monkeypatch, corpus_mod, "_in_split"),
        "train_bpe": counting(monkeypatch, tokenizer_mod, "_train_bpe"),
        "tokenize": counting(monkeypatch, packing_mod, "_encode_batch"),
        "pack": counting(monkeypatch, packing_mod, "_generate_blocks"),
    }
    first = LMDataModule(cfg)
    first.prepare_data()
    assert all(calls[0] > 0 for calls in work.values()), work
    for calls in work.values():
        calls[0] = 0
    first.setup("fit")  # loads what prepare_data cached
    second = LMDataModule(cfg)
    second.prepare_data()
    second.setup("fit")
    assert all(calls[0] == 0 for calls in work.values()), work
    assert second.fingerprint == first.fingerprint
    assert second.blocks["train"].cache_files == first.blocks["train"].cache_files
    assert second.stats() == first.stats()

    # A new block length re-packs from the cached tokens; a new vocabulary retrains and re-tokenizes.
    second = LMDataModule(text_cfg(tmp_path, seq_len=31, tokenizer=cfg.tokenizer))
    second.setup("fit")
    assert (work["train_bpe"][0], work["tokenize"][0]) == (0, 0) and work["pack"][0] == 3
    second = LMDataModule(text_cfg(tmp_path, tokenizer=TokenizerConfig(kind="bpe", vocab_size=280)))
    second.setup("fit")
    assert work["train_bpe"][0] == 1 and work["tokenize"][0] > 0
    assert second.fingerprint != first.fingerprint


def test_changed_file_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = text_cfg(tmp_path)
    first = LMDataModule(cfg)
    first.setup("fit")
    tokenize = counting(monkeypatch, packing_mod, "_encode_batch")
    with open(tmp_path / "corpus.txt", "a") as f:
        f.write("one more line of text\n")
    second = LMDataModule(cfg)
    second.setup("fit")
    assert tokenize[0] > 0 and second.fingerprint != first.fingerprint
    assert sum(s["documents"] for s in second.stats()["splits"].values()) == 301


# --- the stdlib corpus ----------------------------------------------------------------------------------


def test_stdlib_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(
        max_documents=40,
        val_fraction=0.2,
        test_fraction=0.2,
        tokenizer=TokenizerConfig(kind="bytes"),
        seq_len=63,
        cache_dir=str(tmp_path),
    )
    dm = LMDataModule(cfg)
    dm.setup("fit")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)[:40]
    for split in ("train", "validation", "test"):  # reference: read the files the hash assigns to split
        expected = [
            decode_utf8((root / rel).read_bytes())[0]
            for rel, *_ in files
            if split_of(rel, 0, 0.2, 0.2) == split
        ]
        assert dm.corpus[split]["text"] == expected and expected
    stats = dm.stats()
    for row in stats["splits"].values():
        assert row["tokens"] == row["bytes"] + row["documents"]  # bytes tokenizer: one id per byte + EOS
        assert row["blocks"] == row["tokens"] // 64
    assert stats["vocab_size"] == 257 and stats["bytes_per_token"] == 1.0
    assert "validation" in format_stats(stats)

    reads = counting(monkeypatch, corpus_mod, "_read_files")
    again = LMDataModule(cfg)
    again.setup("fit")
    assert reads[0] == 0 and again.fingerprint == dm.fingerprint


# --- bad input ------------------------------------------------------------------------------------------


def test_missing_and_empty_data_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        build_corpus(text_cfg(tmp_path, data_files=str(tmp_path / "nope*.txt")))
    assert err.value.key == "data.data_files" and "nope" in str(err.value)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError) as err:
        build_corpus(
            text_cfg(tmp_path, data_files=[str(tmp_path / "corpus.txt"), str(tmp_path / "empty.txt")])
        )
    assert err.value.key == "data.data_files" and "empty" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_corpus(text_cfg(tmp_path, data_files=None))
    assert err.value.key == "data.data_files"


def test_missing_text_column(tmp_path: Path) -> None:
    rows = [{"body": f"document {i} " * 5, "n": i} for i in range(50)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = text_cfg(tmp_path, path="json", data_files=str(tmp_path / "docs.jsonl"))
    with pytest.raises(ConfigError) as err:
        build_corpus(cfg)
    assert err.value.key == "data.text_column" and "body" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_corpus(
            text_cfg(tmp_path, path="json", data_files=str(tmp_path / "docs.jsonl"), text_column="n")
        )
    assert err.value.key == "data.text_column"
    corpus = build_corpus(
        text_cfg(tmp_path, path="json", data_files=str(tmp_path / "docs.jsonl"), text_column="body")
    )
    assert sorted(t for s in corpus.values() for t in s["text"]) == sorted(r["body"] for r in rows)


@pytest.mark.parametrize("builder", ["text", "json"])
def test_non_utf8_bytes_are_replaced_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, builder: str
) -> None:
    good = [f"line {i} is fine" for i in range(60)]
    bad = ["caf\xe9 au lait".encode("latin-1"), b"\xff\xfe broken start", b"end \x80"]  # 1 + 2 + 1 bytes
    path = tmp_path / f"mixed.{builder}"
    if builder == "text":
        path.write_bytes(b"\n".join([g.encode() for g in good] + bad) + b"\n")
    else:
        escaped = [json.dumps({"text": g}).encode() for g in good]
        path.write_bytes(b"\n".join(escaped + [b'{"text": "' + b + b'"}' for b in bad]) + b"\n")
    with caplog.at_level(logging.WARNING, logger="distill.data"):
        corpus = build_corpus(text_cfg(tmp_path, path=builder, data_files=str(path)))
    assert "4 bytes are not UTF-8" in caplog.text and path.name in caplog.text
    texts = {t for s in corpus.values() for t in s["text"]}
    assert {"caf\ufffd au lait", "\ufffd\ufffd broken start", "end \ufffd"} <= texts
    assert set(good) <= texts


def test_decode_utf8_counts_replaced_bytes() -> None:
    assert decode_utf8("ok é".encode()) == ("ok é", 0)
    assert decode_utf8(b"a\xe2\x82b\xff") == ("a\ufffdb\ufffd", 3)  # a truncated 3-byte sequence + 1 byte


def test_corpus_smaller_than_one_block(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        LMDataModule(text_cfg(tmp_path, n=30, seq_len=4096)).setup("fit")
    assert err.value.key == "data.seq_len" and "fewer than one block" in str(err.value)
    with pytest.raises(ConfigError) as err:  # 3 documents cannot fill three splits
        build_corpus(text_cfg(tmp_path, max_documents=3))
    assert err.value.key in ("data.val_fraction", "data.test_fraction", "data.max_documents")


def test_bad_tokenizer_paths(tmp_path: Path) -> None:
    (tmp_path / "not-a-tokenizer.json").write_text('{"hello": 1}')
    (tmp_path / "empty-dir").mkdir()
    for path in ("/no/such/tokenizer.json", tmp_path / "not-a-tokenizer.json", tmp_path / "empty-dir"):
        with pytest.raises(ConfigError) as err:
            build_tokenizer(DataConfig(tokenizer=TokenizerConfig(kind="pretrained", path=str(path))), None)
        assert err.value.key == "data.tokenizer.path", path
    # a tokenizer without the configured end-of-text token
    bare = build_tokenizer(DataConfig(tokenizer=TokenizerConfig(kind="bytes")), None).save(tmp_path / "bare")
    cfg = DataConfig(tokenizer=TokenizerConfig(kind="pretrained", path=str(bare), eos_token="</s>"))
    with pytest.raises(ConfigError) as err:
        build_tokenizer(cfg, None)
    assert err.value.key == "data.tokenizer.eos_token"


def test_unknown_hub_dataset_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        build_corpus(text_cfg(tmp_path, path="no-such-user/no-such-dataset", data_files=None))
    assert err.value.key == "data.path"


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"source": "web"}, "data.source"),
        ({"path": None}, "data.path"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "data.val_fraction"),
        ({"seq_len": 0}, "data.seq_len"),
        ({"tokenizer": TokenizerConfig(kind="wordpiece")}, "data.tokenizer.kind"),
        ({"tokenizer": TokenizerConfig(kind="bpe", vocab_size=100)}, "data.tokenizer.vocab_size"),
        ({"tokenizer": TokenizerConfig(kind="pretrained")}, "data.tokenizer.path"),
    ],
)
def test_config_checks_name_the_key(tmp_path: Path, overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        text_cfg(tmp_path, **overrides).validate()
    assert err.value.key == key


def test_entry_point_exits_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    @exit_on_config_error
    def main() -> None:
        build_corpus(text_cfg(tmp_path, text_column="body"))

    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "data.text_column" in errors[0]  # (progress bars aside)


# --- loaders --------------------------------------------------------------------------------------------


def test_distributed_sampling_covers_without_overlap(tmp_path: Path) -> None:
    dm = LMDataModule(text_cfg(tmp_path))
    dm.setup("fit")
    for row in dm.stats()["splits"].values():  # bytes tokenizer: one id per byte, one EOS per document
        assert row["tokens"] == row["bytes"] + row["documents"] and row["blocks"] == row["tokens"] // 16
    blocks = np.array(dm.blocks["train"]["input_ids"])
    n = len(blocks)
    assert n > 20

    def shard(rank: int, seed: int = 0, epoch: int = 0) -> tuple[list[int], np.ndarray]:
        dm.cfg.seed = seed
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        indices = list(loader.sampler)
        rows = np.concatenate([b["input_ids"].numpy() for b in loader])
        batch = next(iter(loader))["input_ids"]
        assert batch.dtype.is_floating_point is False and batch.shape == (4, 16)
        return indices, rows

    (i0, rows0), (i1, rows1) = shard(0), shard(1)
    assert not set(i0) & set(i1) and len(i0) == len(i1) == n // 2
    assert set(i0) | set(i1) == set(range(n)) - ({n - 1} if n % 2 else set())
    np.testing.assert_array_equal(rows0, blocks[i0])  # the loader yields exactly the sampled blocks
    np.testing.assert_array_equal(rows1, blocks[i1])
    assert i0 != sorted(i0)  # shuffled
    assert shard(0)[0] == i0  # deterministic from the seed
    assert shard(0, seed=1)[0] != i0 and shard(0, epoch=1)[0] != i0

    dm.trainer = None  # no trainer: one replica sees every block
    assert sorted(dm.train_dataloader().sampler) == list(range(n))
    val = np.concatenate([b["input_ids"].numpy() for b in dm.val_dataloader()])
    np.testing.assert_array_equal(val, np.array(dm.blocks["validation"]["input_ids"]))  # in order


@pytest.mark.parametrize("name", ["stdlib", "local_text", "hf"])
def test_conf_data_yaml_matches_schema(name: str) -> None:
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / "conf" / "data" / f"{name}.yaml"
    node = OmegaConf.load(path)
    assert "defaults" not in node
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), node))  # unknown keys fail here
    assert isinstance(cfg, DataConfig) and isinstance(cfg.tokenizer, TokenizerConfig)
    if name == "local_text":
        cfg.data_files = "corpus.txt"
    assert cfg.validate() is cfg
