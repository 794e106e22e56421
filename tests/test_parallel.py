"""Parallel layouts on a device mesh (distill/parallel): layouts, bad input, and multi-process runs on gloo (CPU).

Multi-process tests start every rank as a subprocess of pytest (tests/parallel_*worker.py, or the Hydra
apps, which launch their second rank themselves) and SIGKILL the whole process group after a timeout:
a process stuck in a gloo collective ignores SIGTERM. Lightning's popen launcher never runs inside
the pytest process.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from parallel_worker import SEQ

from distill.errors import ConfigError
from distill.models import ModelConfig
from distill.models.fused import FUSED_LAYOUT
from distill.moe import MoEConfig
from distill.parallel import MeshStrategy, ParallelConfig
from distill.parallel.checkpoint import inspect_sharded, remove_leftovers
from distill.parallel.dispatch import source_to_expert_order
from distill.parallel.launch import child_env, run_processes, run_ranks
from distill.parallel.mesh import layer_group_size

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TOL = 1e-5


# ----------------------------------------------------------------------------------------------------
# launching processes


def check_ok(cmd: list[str], results: list[tuple[int, str]]) -> list[str]:
    for rank, (code, out) in enumerate(results):
        what = "was killed at the timeout" if code == -9 else f"exited {code}"
        assert code == 0, f"{' '.join(cmd)} (process {rank}) {what}:\n{out[-4000:]}"
    return [out for _, out in results]


def run_worker(script: Path, args: list[str], world: int, timeout: float = 120) -> list[str]:
    """One process per rank of a torch.distributed job on gloo."""
    cmd = [sys.executable, str(script), *args]
    return check_ok(cmd, run_ranks(cmd, world, timeout, cwd=ROOT))


# ----------------------------------------------------------------------------------------------------
# layouts and bad input (no processes)


@pytest.mark.parametrize("sizes, world, expected", [
    ({}, 4, (1, 4, 1)),  # dp_shard -1: the rest
    ({"ep": 2}, 4, (1, 2, 2)),
    ({"ep": 4, "dp_shard": 1}, 4, (1, 1, 4)),
    ({"dp_replicate": 2, "dp_shard": 2}, 4, (2, 2, 1)),
    ({"dp_replicate": -1, "dp_shard": 1}, 8, (8, 1, 1)),
    ({"ep": 2}, 1 * 2, (1, 1, 2)),
    ({"tp": 2, "ep": 2}, 8, (1, 2, 2)),  # dp_shard is the rest after ep x tp
])
def test_layouts_fill_the_world(sizes: dict, world: int, expected: tuple) -> None:
    lay = ParallelConfig(**sizes).resolve(world)
    assert (lay.dp_replicate, lay.dp_shard, lay.ep) == expected
    assert lay.data_parallel * lay.tp == world


@pytest.mark.parametrize("sizes, world, key", [
    ({"ep": 3}, 4, "parallel.ep"),  # 3 does not divide 4
    ({"ep": 2, "dp_shard": 1}, 4, "parallel.ep"),  # product 2, world 4
    ({"ep": -1, "dp_shard": -1}, 4, "parallel.ep"),  # two rests
    ({"ep": 0}, 4, "parallel.ep"),
    ({"tp": 3}, 4, "parallel.tp"),  # 3 does not divide 4
    ({"tp": 2, "ep": 4}, 4, "parallel.ep"),  # product 8, world 4
    ({"dp_shard": 2.5}, 4, "parallel.dp_shard"),
])
def test_bad_layouts_name_the_config_keys(sizes: dict, world: int, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        ParallelConfig(**sizes).resolve(world)
    assert err.value.key == key
    for experts, ep in [(6, 4), (3, 4), (5, 2)]:
        with pytest.raises(ConfigError) as err:
            layer_group_size(experts, ep)
        assert err.value.key == "model.num_experts" and "parallel.ep" in str(err.value)
    assert [layer_group_size(e, 4) for e in (1, 2, 4, 8, 12)] == [1, 2, 4, 4, 4]


def test_source_to_expert_order_matches_naive() -> None:
    gen = torch.Generator().manual_seed(0)
    for g, n_local in [(1, 1), (2, 3), (4, 2), (3, 1)]:
        counts = torch.randint(0, 4, (g, n_local), generator=gen)
        counts[0, 0] = 0  # empty chunks too
        total = int(counts.sum())
        chunks, pos = {}, 0  # rows arrive source by source, each source's rows grouped by local expert
        for s in range(g):
            for e in range(n_local):
                chunks[s, e] = list(range(pos, pos + int(counts[s, e])))
                pos += int(counts[s, e])
        naive = [i for e in range(n_local) for s in range(g) for i in chunks[s, e]]
        assert source_to_expert_order(counts, total).tolist() == naive


def test_strategy_rejects_bad_layouts_before_any_process_group() -> None:
    """Raised while the Trainer is built (world size) or when the model is connected (experts), in every
    process alike and before the process group exists: nothing can hang."""
    with pytest.raises(ConfigError, match="parallel.ep"):
        L.Trainer(accelerator="cpu", devices=2, strategy=MeshStrategy({"ep": 4}), logger=False)
    with pytest.raises(ConfigError, match="teacher.parallel"):
        L.Trainer(accelerator="cpu", devices=2, strategy=MeshStrategy({}, teacher_layout={"ep": 4}), logger=False)
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=MeshStrategy({"ep": 4}), logger=False)
    cfg = ModelConfig(name="t", vocab_size=32, d_model=16, n_layers=4, n_heads=2, max_seq_len=8,
                      num_experts=[4, 6], moe=MoEConfig())
    from distill.config import OptimConfig
    from distill.train.lm_module import LMModule

    with pytest.raises(ConfigError) as err:
        trainer.strategy.connect(LMModule(cfg, OptimConfig(), max_steps=1))
    assert err.value.key == "model.num_experts" and "6 experts" in str(err.value)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("overrides, layout", [
    (["strategy=mesh", "parallel.ep=2"], {"dp_replicate": 1, "dp_shard": 1, "ep": 2}),
    (["strategy=expert_parallel"], {"dp_replicate": 1, "dp_shard": 1, "ep": 2}),  # ep = trainer.devices
])
def test_hydra_config_builds_the_strategy(overrides: list[str], layout: dict) -> None:
    """strategy=mesh / expert_parallel select MeshStrategy by its `_target_` with the `parallel` node; no name is
    registered as an import side effect (a submitit job that unpickles a Trainer config would not have it)."""
    from hydra import compose, initialize_config_dir
    from lightning.pytorch.strategies import StrategyRegistry

    from distill.config import register_configs
    from distill.resolve import resolve
    from distill.train.trainer import build_strategy

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="pretrain", overrides=["out_dir=/nonexistent", "trainer.devices=2",
                                                         "trainer.accelerator=cpu", *overrides])
    strategy = build_strategy(resolve(cfg, "pretrain").strategy)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    assert isinstance(trainer.strategy, MeshStrategy)
    lay = trainer.strategy.layout
    assert {k: getattr(lay, k) for k in layout} == layout
    assert "mesh" not in StrategyRegistry and "expert_parallel" not in StrategyRegistry


def test_a_killed_save_leaves_the_last_good_checkpoint(tmp_path: Path) -> None:
    """A save killed after it moved the old checkpoint aside (the only window) gets it back; half-written
    directories are removed; a truncated or missing shard is named."""
    good = tmp_path / "last.ckpt"
    good.mkdir()
    (good / ".metadata").write_bytes(b"x")
    os_old = tmp_path / ".last.ckpt.old-1234"
    good.rename(os_old)
    (tmp_path / ".last.ckpt.tmp-1234").mkdir()
    (tmp_path / ".step000004.ckpt.tmp-99").mkdir()
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert (tmp_path / "last.ckpt" / ".metadata").read_bytes() == b"x"


def test_bad_sharded_checkpoints_are_named(tmp_path: Path) -> None:
    """A truncated or missing shard file, and a checkpoint of another architecture, are named before any
    tensor is read (the strategy raises them as ConfigError on every rank alike, before DCP's collectives)."""
    from distill.parallel.checkpoint import architecture_mismatch, save_sharded

    path = save_sharded({"state_dict": {"model.w": torch.ones(4, 2), "model.b": torch.zeros(3)}},
                        {"global_step": 7, "loops": {}, "fused_layout": FUSED_LAYOUT}, tmp_path / "step7.ckpt")
    assert inspect_sharded(path) == (None, 7)
    assert architecture_mismatch(path, {"model.w": torch.ones(4, 2), "model.b": torch.zeros(3)}) is None
    assert "model.w is [4, 2] there and [8, 2] here" in architecture_mismatch(
        path, {"model.w": torch.ones(8, 2), "model.b": torch.zeros(3)})
    assert "has no model.c" in architecture_mismatch(path, {"model.w": torch.ones(4, 2), "model.b": torch.zeros(3),
                                                              "model.c": torch.zeros(1)})
    from distill.train.checkpoint_io import AtomicCheckpointIO

    with pytest.raises(ConfigError, match="resume it with strategy=mesh"):  # under a single-file strategy
        AtomicCheckpointIO().load_checkpoint(path)
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    problem, step = inspect_sharded(path)
    assert step is None and str(shard) in problem and "truncated" in problem
    shard.unlink()
    assert "missing" in inspect_sharded(path)[0]


# ----------------------------------------------------------------------------------------------------
# one step on several processes equals one process (tests/parallel_worker.py)

FOUR_RANK_LAYOUTS = ["dp_shard=4", "ep=4,dp_shard=1", "ep=2,dp_shard=2", "dp_replicate=2,dp_shard=2",
                     "ep=4,dp_shard=1,ep_intra=2",  # hierarchical all-to-all, 2 nodes x 2 ranks
                     "ep=2,dp_shard=2,activation_checkpointing=full",  # blocks recomputed in the backward
                     "ep=2,dp_shard=2,activation_checkpointing=moe_only",  # ... keeping the all-to-alls
                     "tp=2,ep=2,dp_shard=1",  # tensor-expert-data: duplicate tokens dropped (the default)
                     "tp=2,ep=2,dp_shard=1,drop_duplicate_tokens=false",
                     "tp=2,dp_shard=2", "tp=4,dp_shard=1",
                     "tp=2,ep=2,dp_shard=1,sequence_parallel=true",  # norms on half the positions
                     "tp=2,dp_shard=2,sequence_parallel=true"]
# held whole by every rank of a tensor-parallel group: norms, routers, the residual mixing and shared gates,
# and the biases added after a row-parallel reduction
TP_WHOLE = re.compile(r".*(ln_\d|ln_f|router|coef|shared_gate)\..*|.*(c_proj|w_out)\.bias")
SCENARIOS = ["dropless", "capacity", "skewed"]
# layouts checked on fewer scenarios (the rest: all three); a layout's scenarios include the ones the layout it
# is compared with must have
ONLY = {"ep=2,dp_shard=2,activation_checkpointing=full": ["capacity"],
        "ep=2,dp_shard=2,activation_checkpointing=moe_only": ["capacity"],
        "tp=2,ep=2,dp_shard=1,drop_duplicate_tokens=false": ["dropless", "capacity"],
        "tp=2,dp_shard=2": ["capacity"], "tp=4,dp_shard=1": ["dropless", "capacity"],
        "tp=2,ep=2,dp_shard=1,sequence_parallel=true": ["capacity"],
        "tp=2,dp_shard=2,sequence_parallel=true": ["dropless"]}
CASES = [(lay, world, scen) for lay, world in [("ep=2,dp_shard=1", 2), *((lay, 4) for lay in FOUR_RANK_LAYOUTS)]
         for scen in ONLY.get(lay, SCENARIOS)]


def worker_name(layout: str) -> str:
    return layout.replace(",", "_").replace("=", "")


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mesh")
    run_worker(TESTS / "parallel_worker.py", [str(out), "ep=2,dp_shard=1", ",".join(SCENARIOS)], world=2)
    layouts = [f"{lay}@{'+'.join(ONLY[lay])}" if lay in ONLY else lay for lay in FOUR_RANK_LAYOUTS]
    run_worker(TESTS / "parallel_worker.py", [str(out), ";".join(layouts), ",".join(SCENARIOS)], world=4, timeout=420)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout, world, scenario", CASES)
def test_layouts_match_one_process(mesh_results: Path, layout: str, world: int, scenario: str) -> None:
    """Loss, every gradient (as a full tensor), the full model's norm, the clipped gradients and every weight
    after one AdamW step equal one process on the same global batch (1e-5)."""
    results = [json.loads((mesh_results / f"{worker_name(layout)}-{scenario}-rank{r}.json").read_text())
               for r in range(world)]
    total = results[0]["total_params"]
    for res in results:
        assert abs(res["loss"] - res["loss_ref"]) < TOL
        worst = max(res["grad_diff"], key=res["grad_diff"].get)
        assert res["grad_diff"][worst] < TOL, f"rank {res['rank']}: {worst} differs by {res['grad_diff'][worst]}"
        assert abs(res["norm"] - res["norm_ref"]) < TOL * res["norm_ref"]
        assert res["clipped_grad_diff"] < TOL and res["weight_diff"] < TOL
        assert res["counts"] == res["ref_counts"]  # aux-loss-free balancing counts summed over the ranks
    held = sum(r["local_params"] for r in results)
    replicas = 2 if layout.startswith("dp_replicate=2") else 1
    tp = int(re.search(r"tp=(\d)", layout)[1]) if "tp=" in layout else 1
    # every parameter held once per replica (no rank holds a full copy), those kept whole under tensor
    # parallelism once per tp rank
    assert held == replicas * (total + (tp - 1) * results[0]["tp_whole_numel"])
    if tp > 1:
        assert results[0]["tp_whole"] and all(TP_WHOLE.fullmatch(n) for n in results[0]["tp_whole"]), results[0]
    # the residual stream: every position on every rank, or with sequence parallelism 1/tp of them
    seq = SEQ // tp if "sequence_parallel=true" in layout else SEQ
    assert all(set(r["positions"]) == {seq} for r in results), [r["positions"] for r in results]  # recomputed too
    if "drop_duplicate_tokens=false" in layout:  # each tp rank sent every row; dropping: its share only
        dropped = [json.loads((mesh_results / f"{worker_name(layout.rsplit(',', 1)[0])}-{scenario}-rank{r}.json")
                              .read_text()) for r in range(world)]
        assert [r["loss"] for r in dropped] == pytest.approx([r["loss"] for r in results], abs=1e-6)
        assert sum(r["a2a_bytes"] for r in results) == tp * sum(r["a2a_bytes"] for r in dropped) > 0
        assert all("tp_all_reduce" in r["tp_other"] for r in results)
        assert all("tp_all_gather" in r["tp_other"] and "tp_reduce_scatter" in r["tp_other"] for r in dropped)
    if scenario == "dropless":  # no drops: the loss of one forward over the whole global batch too
        assert all(abs(r["ce"] - r["ce_full_batch"]) < TOL for r in results)
    if scenario == "skewed" and "ep=" in layout:  # a rank whose experts got no rows still took part
        assert any(r["received"][0] == 0 for r in results) and any(r["received"][0] > 0 for r in results)
    if "activation_checkpointing" in layout:  # full: the backward runs every all-to-all again; moe_only: none
        plain = [json.loads((mesh_results / f"{worker_name('ep=2,dp_shard=2')}-{scenario}-rank{r}.json").read_text())
                 for r in range(world)]
        again = 2 if layout.endswith("=full") else 1
        assert [r["all_to_alls"] for r in results] == [again * r["all_to_alls"] for r in plain]
        assert all(r["all_to_alls"] > 0 for r in plain)
    if layout == "ep=4,dp_shard=1,ep_intra=2":  # within the node, then across: what each rank computes is the flat's
        flat = [json.loads((mesh_results / f"{worker_name('ep=4,dp_shard=1')}-{scenario}-rank{r}.json").read_text())
                for r in range(world)]
        assert [r["received"] for r in results] == [r["received"] for r in flat]
        assert [r["loss"] for r in results] == [r["loss"] for r in flat]
    if layout == "ep=4,dp_shard=1" and scenario == "dropless":  # experts [4, 2, 1]: groups of 4, 2 and 1
        local = {name: shape[0] for name, shape in results[0]["experts"].items()}
        assert local["blocks.1.ffn.experts.w_in"] == 1 and local["blocks.3.ffn.experts.w_in"] == 1
        assert local["blocks.5.ffn.experts.w_in"] == 1  # the 1-expert layer is replicated


# ----------------------------------------------------------------------------------------------------
# Lightning: training, checkpoints across layouts and world sizes, a SIGKILL, distillation
# (tests/parallel_lightning_worker.py)


@pytest.mark.slow
def test_lightning_checkpoints_resume_at_any_layout(tmp_path: Path) -> None:
    worker = TESTS / "parallel_lightning_worker.py"
    run_worker(worker, [str(tmp_path), "two"], world=2, timeout=240)
    cmd = [sys.executable, str(worker), str(tmp_path), "kill"]
    killed = run_ranks(cmd, 4, timeout=240, cwd=ROOT)
    assert any(code == -9 for code, _ in killed), [out[-2000:] for _, out in killed]
    run_worker(worker, [str(tmp_path), "four"], world=4, timeout=300)
    run_worker(worker, [str(tmp_path), "tp"], world=4, timeout=240)
    run_worker(worker, [str(tmp_path), "one"], world=1, timeout=240)
    run_worker(worker, [str(tmp_path), "two2"], world=2, timeout=240)
    res = {}
    for job in ("two", "four", "tp", "one", "two2"):
        res.update(json.loads((tmp_path / f"{job}.json").read_text()))
    a = {int(k): v for k, v in res["A"].items()}
    b = {int(k): v for k, v in res["B"].items()}
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in a:  # ep=2 on 2 processes trains exactly like ep=2 x dp_shard=2 on 4
        assert abs(a[step] - b[step]) < TOL, (step, a[step], b[step])
    # saved at ep=2 x dp_shard=2 (A), resumed on 1 process (C1) and at ep=2 (C2); saved at ep=2 (B), resumed
    # at ep=2 x dp_shard=2 (D) and on 1 process (E); the SIGKILLed run resumed from its last good checkpoint (R);
    # a one-process .ckpt file written by Lightning's own strategy (F) resumed at ep=2 (G)
    f = {int(k): v for k, v in res["F"].items()}  # one device, Lightning's own strategy: the same training
    assert all(abs(f[step] - a[step]) < TOL for step in a)
    t = {int(k): v for k, v in res["T"].items()}  # tp=2 x ep=2 trains exactly like ep=2 x dp_shard=2
    assert all(abs(t[step] - a[step]) < TOL for step in a), (t, a)
    # ... T's step 2 (saved at tp=2 x ep=2) resumed on one process (T1)
    for run, ref in (("C1", a), ("C2", a), ("D", b), ("E", b), ("R", a), ("G", f), ("T1", t)):
        got = {int(k): v for k, v in res[run].items()}
        assert sorted(got) == [2, 3], (run, got)
        for step in got:
            assert abs(got[step] - ref[step]) < 1e-6, (run, step, got[step], ref[step])
    assert res["R_from"] == "step2.ckpt"
    ckpt = tmp_path / "A" / "step2.ckpt"
    assert inspect_sharded(ckpt) == (None, 2)
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]  # one per rank
    # distillation, student at ep=2 x dp_shard=2 and teacher at ep=4, equals one process (KD loss included)
    k, k1 = res["K"], res["K1"]
    assert all(abs(k[s] - k1[s]) < TOL for s in k1) and res["K_teacher_calls"] == res["K1_teacher_calls"] == 4
    assert res["K_kd"] > 0 and abs(res["K_kd"] - res["K1_kd"]) < TOL  # the KD term itself, last step
    # ... and with the student at tp=2 x ep=2 and the teacher at tp=2 x dp_shard=2 (vocabulary-parallel KD)
    kt = res["KT"]
    assert all(abs(kt[s] - k1[s]) < TOL for s in k1) and abs(res["KT_kd"] - res["K1_kd"]) < TOL
    # staged KD: the teacher ran until the stop step, then was released and freed on every rank
    assert res["S_teacher_calls"] == 2 and res["S_released"] and res["S_teachers_alive"] == 0


# ----------------------------------------------------------------------------------------------------
# the Hydra apps, as a user runs them


TINY = [
    "trainer=smoke", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv", "strategy=expert_parallel",
    "strategy.timeout_s=60", "data.max_documents=60", "data.seq_len=32", "data.batch_size=4",
    "data.tokenizer.vocab_size=512",
]


def run_app(app: str, out: Path, *overrides: str) -> str:
    cmd = [sys.executable, "-m", f"distill.{app}", *TINY, *overrides, f"out_dir={out}", f"hydra.run.dir={out}"]
    return check_ok(cmd, run_processes([(cmd, child_env())], timeout=240, cwd=ROOT))[0]


@pytest.mark.slow
def test_apps_pretrain_and_distill_on_the_mesh(tmp_path: Path) -> None:
    """The apps as a user runs them: pretrain at strategy=expert_parallel (sharded checkpoints, a streamed
    export), then distil a tensor-parallel student with the teacher in a layout of its own."""
    from safetensors import safe_open

    from distill.parallel.checkpoint import dcp_shapes

    teacher = tmp_path / "teacher"
    log = run_app("pretrain", teacher, "model.d_model=32", "model.n_heads=2", "model.max_seq_len=32")
    assert "[pretrain] val loss" in log and "mesh: ep=2 over 2 ranks" in log
    last = teacher / "checkpoints" / "last.ckpt"
    assert inspect_sharded(last) == (None, 4)
    shapes = {k.removeprefix("state_dict.model."): v for k, v in dcp_shapes(last).items()
              if k.startswith("state_dict.model.")}
    assert shapes["blocks.1.ffn.experts.w_in"][0] == 4 and shapes["blocks.3.ffn.experts.w_in"][0] == 8
    with safe_open(str(teacher / "export" / "model.safetensors"), "pt") as f:
        exported = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert len(exported) == len(shapes) - 1 and all(shapes[k] == v for k, v in exported.items())  # tied: once

    # the student tensor-parallel (heads, hidden units, vocabulary over the 2 ranks), the teacher in a layout of
    # its own (dense and experts sharded over the 2 ranks)
    log = run_app("distill", tmp_path / "student", f"teacher.path={teacher / 'export'}", "parallel.tp=2",
                  "parallel.ep=1", "parallel.dp_shard=1", "teacher.parallel.dp_shard=2", "teacher.parallel.ep=1")
    assert "[distill] val loss" in log and "mesh: tp=2 over 2 ranks" in log, log[-3000:]
    held = re.search(r"teacher loaded at dp_shard=2; rank 0 holds ([\d,]+) of ([\d,]+) of its parameters", log)
    assert held, log[-3000:]
    local, total = (int(x.replace(",", "")) for x in held.groups())
    assert abs(2 * local - total) <= 64  # half, up to the padding of uneven shards
