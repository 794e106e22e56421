"""Offline teacher targets (distill/kd/targets.py, `python -m distill.teacher_targets`, kd.teacher_targets=offline)
through the real apps on a small local corpus."""

from __future__ import annotations

import json
import string
import textwrap
from pathlib import Path

import pytest

from distill.errors import ConfigError
from distill.export import load_exported
from distill.kd.targets import META, load_targets, read_meta
from tests.test_apps import TINY_MODEL, run_app


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(Path(m.__file__).read_text() for m in (textwrap, string)))
    return path


@pytest.fixture(scope="module")
def data(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cache = tmp_path_factory.mktemp("cache")  # this module's targets only
    return ["data=local_text", f"data.data_files={corpus}", "data.seq_len=32", "data.batch_size=8",
            "data.tokenizer.vocab_size=300", "data.val_fraction=0.1", "data.test_fraction=0.1",
            f"data.cache_dir={cache}"]


@pytest.fixture(scope="module")
def teacher(data: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    # dropless: a capacity-limited teacher drops tokens depending on what else is in the batch, so its online
    # outputs (shuffled training batches) and its stored ones (consecutive blocks) would differ slightly
    run_app("pretrain", *data, *TINY_MODEL, "model.moe.dropless=true", "trainer=smoke", "trainer.max_steps=2",
            "logger=none", f"hydra.run.dir={out}")
    return out / "export"


def test_targets_app_computes_once_then_reuses(data: list[str], teacher: Path, tmp_path: Path) -> None:
    args = [*data, f"teacher.path={teacher}", "kd.topk=32", "logger=none"]
    first = run_app("teacher_targets", *args, f"hydra.run.dir={tmp_path / 'a'}")
    assert "[teacher_targets] computed" in first.stdout, first.stdout[-2000:]
    path = Path(first.stdout.strip().split("-> ")[-1])
    meta = read_meta(path)
    assert meta["k"] == 32 and meta["rows"] > 0 and meta["shards"] >= 1
    assert meta["bytes_per_token"] <= 200, meta  # the goal at k = 32 with the router targets
    again = run_app("teacher_targets", *args, f"hydra.run.dir={tmp_path / 'b'}")
    assert "[teacher_targets] reused" in again.stdout and again.stdout.strip().endswith(str(path))
    with pytest.raises(ConfigError) as err:  # made for another teacher: refused, not used
        load_targets(path, {"teacher_sha256": "0" * 64})
    assert err.value.key == "kd.teacher_targets"


def test_offline_and_online_kd_agree_when_k_covers_the_vocabulary(data: list[str], teacher: Path,
                                                                     tmp_path: Path) -> None:
    cfg = load_exported(teacher)[1]
    vocab = cfg.vocab_size
    # router KD too, from the stored routes: every expert of every teacher MoE layer stored (r = E)
    common = [*data, f"teacher.path={teacher}", "trainer=smoke", "trainer.max_steps=2", "kd=full", "logger=csv",
              "kd.router_weight=0.5", f"kd.router_topk={max(cfg.num_experts)}"]
    run_app("distill", *common, f"hydra.run.dir={tmp_path / 'online'}")
    offline = run_app("distill", *common, "kd.teacher_targets=offline", f"kd.topk={vocab}",
                      "kd.targets_dtype=float32", f"hydra.run.dir={tmp_path / 'offline'}")
    assert "teacher calls 0" in offline.stdout  # the teacher never ran during training
    rows = {name: [json.loads(line) for line in (tmp_path / name / "losses.jsonl").read_text().splitlines()]
            for name in ("online", "offline")}
    on, off = rows["online"][0]["kd"], rows["offline"][0]["kd"]
    assert on > 0 and abs(on - off) <= 1e-5 * on, (on, off)
    on, off = rows["online"][0]["router_kd"], rows["offline"][0]["router_kd"]
    assert on > 0 and abs(on - off) <= 1e-5 * on, (on, off)
    assert abs(rows["online"][0]["ce"] - rows["offline"][0]["ce"]) <= 1e-6  # the same student, the same batch

    # a damaged shard is named, the run exits 2 and writes nothing
    path = next(p for p in (Path(data[-1].split("=", 1)[1]) / "teacher_targets").iterdir()
                if p.is_dir() and f"k{vocab}" in p.name)  # (beside it: its lock file)
    shard = sorted(path.glob("*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    assert (path / META).is_file()
    bad = run_app("distill", *common, "kd.teacher_targets=offline", f"kd.topk={vocab}", "kd.targets_dtype=float32",
                  f"hydra.run.dir={tmp_path / 'bad'}", ok=False)
    assert bad.returncode == 2 and "`kd.teacher_targets`" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow
def test_two_processes_share_one_computation_and_read_their_own_shards(data: list[str], teacher: Path,
                                                                        tmp_path: Path) -> None:
    """DDP over 2 real processes (gloo): the targets are computed by one of them (a file lock; the other
    reuses them) and each replica reads only its own shards."""
    run = run_app("distill", *data, f"teacher.path={teacher}", "trainer=smoke", "trainer.max_steps=2", "kd=full",
                  "logger=none", "strategy=ddp", "trainer.devices=2", "kd.teacher_targets=offline", "kd.topk=16",
                  f"hydra.run.dir={tmp_path}")
    out = run.stdout + run.stderr
    assert out.count("teacher targets: reusing") == 1 and "teacher calls 0" in out, out[-3000:]
    assert "replica 0 of 2 reads shards [0, 2]" in out and "replica 1 of 2 reads shards [1, 3]" in out, out[-3000:]
