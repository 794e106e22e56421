"""Expert parallelism (distill/parallel): layouts, bad input, and multi-process runs on gloo (CPU).

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
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from distill.errors import ConfigError
from distill.models import ModelConfig
from distill.moe import MoEConfig
from distill.parallel import ExpertParallelStrategy
from distill.parallel.dispatch import source_to_expert_order
from distill.parallel.groups import LayerLayout, check_world, layer_group_size
from distill.parallel.launch import child_env, run_processes, run_ranks

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


@pytest.mark.parametrize("world,ep", [(1, 1), (2, 2), (4, 2), (4, 4), (8, 4)])
@pytest.mark.parametrize("num_experts", [1, 2, 4, 8])
def test_layouts_cover_every_expert(world: int, ep: int, num_experts: int) -> None:
    if ep % min(ep, num_experts):
        pytest.skip("not a valid layout")
    g = layer_group_size(num_experts, ep)
    layouts = [LayerLayout(num_experts, g, r, world) for r in range(world)]
    held = {r: set(range(lay.expert_offset, lay.expert_offset + lay.num_local)) for r, lay in enumerate(layouts)}
    for lay in layouts:
        ep_ranks = lay.ep_ranks
        assert lay.rank in ep_ranks and ep_ranks == list(range(ep_ranks[0], ep_ranks[0] + g))
        assert ep_ranks[0] // ep == ep_ranks[-1] // ep  # inside one expert-parallel group of ep ranks
        assert set().union(*(held[r] for r in ep_ranks)) == set(range(num_experts))  # the group has them all
        assert sum(len(held[r]) for r in ep_ranks) == num_experts  # ... once each
        assert [r for r in range(world) if held[r] == held[lay.rank]] == lay.edp_ranks  # replicas = EDP group
        assert len(lay.edp_ranks) == lay.replicas == world // g


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


def test_bad_layouts_name_the_config_keys() -> None:
    with pytest.raises(ConfigError) as err:
        check_world(6, 4)
    assert err.value.key == "strategy.ep_size" and "6" in str(err.value)
    for experts, ep in [(6, 4), (3, 4), (5, 2)]:
        with pytest.raises(ConfigError) as err:
            layer_group_size(experts, ep)
        assert err.value.key == "model.num_experts" and "strategy.ep_size" in str(err.value)
    assert [layer_group_size(e, 4) for e in (1, 2, 4, 8, 12)] == [1, 2, 4, 4, 4]


def test_strategy_rejects_bad_layouts_before_any_process_group() -> None:
    """Raised while the Trainer is built (world size) or when the model is connected (experts), in every
    process alike and before the process group exists: nothing can hang."""
    with pytest.raises(ConfigError, match="strategy.ep_size"):
        L.Trainer(accelerator="cpu", devices=2, strategy=ExpertParallelStrategy(ep_size=4), logger=False)
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=ExpertParallelStrategy(ep_size=4), logger=False)
    cfg = ModelConfig(name="t", vocab_size=32, d_model=16, n_layers=4, n_heads=2, max_seq_len=8,
                      num_experts=[4, 6], moe=MoEConfig())
    from distill.config import OptimConfig
    from distill.train.lm_module import LMModule

    with pytest.raises(ConfigError) as err:
        trainer.strategy.connect(LMModule(cfg, OptimConfig(), max_steps=1))
    assert err.value.key == "model.num_experts" and "6 experts" in str(err.value)
    assert not torch.distributed.is_initialized()


def test_hydra_config_builds_the_strategy() -> None:
    """strategy=expert_parallel selects it by its `_target_`; no name is registered as an import side effect
    (a submitit job that unpickles a Trainer config would not have it)."""
    from lightning.pytorch.strategies import StrategyRegistry

    from distill.train.trainer import build_strategy

    node = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "strategy" / "expert_parallel.yaml"))
    strategy = build_strategy(node)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    assert isinstance(trainer.strategy, ExpertParallelStrategy) and trainer.strategy.ep_size == 2  # = devices
    strategy = build_strategy({**node, "ep_size": 1})
    assert isinstance(strategy, ExpertParallelStrategy) and strategy.ep_size == 1
    assert "expert_parallel" not in StrategyRegistry


# ----------------------------------------------------------------------------------------------------
# one step on several processes equals one process (tests/parallel_worker.py)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ep2")
    run_worker(TESTS / "parallel_worker.py", [str(out), "2", "dropless,capacity,skewed"], world=2)
    return out


def check_worker_results(out: Path, scenario: str, world: int) -> list[dict[str, Any]]:
    results = [json.loads((out / f"{scenario}-rank{r}.json").read_text()) for r in range(world)]
    for res in results:
        assert abs(res["loss_ep"] - res["loss_ref"]) < TOL
        worst = max(res["grad_diff"], key=res["grad_diff"].get)
        assert res["grad_diff"][worst] < TOL, f"rank {res['rank']}: {worst} differs by {res['grad_diff'][worst]}"
        assert abs(res["norm_ep"] - res["norm_ref"]) < TOL * res["norm_ref"]
        assert res["clipped_grad_diff"] < TOL
        assert res["unsharded_diff"] < TOL  # gathered back after one AdamW step: equals the reference
    zero = results[0]
    assert zero["state_shapes_equal"] and zero["state_diff"] < TOL  # consolidated = one-process state dict
    assert zero["opt_state_diff"] < TOL and zero["opt_slice_roundtrip_diff"] == 0.0
    return results


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["dropless", "capacity", "skewed"])
def test_two_ranks_match_one_process(two_rank_results: Path, scenario: str) -> None:
    results = check_worker_results(two_rank_results, scenario, world=2)
    if scenario == "dropless":  # no drops: the loss of one forward over the whole global batch too
        assert all(abs(r["ce_ep"] - r["ce_full_batch"]) < TOL for r in results)
        # the 1-expert layer is replicated (group of 1), the others split over both ranks
        assert results[1]["layouts"]["model.blocks.1.ffn.experts.w_in"] == [2, 2, 2]
        assert results[1]["layouts"]["model.blocks.5.ffn.experts.w_in"] == [1, 0, 1]
    if scenario == "skewed":  # rank 1's experts got no rows, yet every collective completed
        assert results[1]["received"] == [0, 0] and results[0]["received"] == [64, 64]


@pytest.mark.slow
def test_four_ranks_with_smaller_groups(tmp_path: Path) -> None:
    """ep=4 on 4 ranks with layers of 4, 2 and 1 experts: groups of 4, 2 (experts replicated twice,
    EDP groups {0,2} and {1,3}) and 1 (replicated on all ranks)."""
    run_worker(TESTS / "parallel_worker.py", [str(tmp_path), "4", "dropless"], world=4)
    results = check_worker_results(tmp_path, "dropless", world=4)
    assert [r["layouts"]["model.blocks.3.ffn.experts.w_in"] for r in results] == [
        [2, 0, 1], [2, 1, 1], [2, 0, 1], [2, 1, 1]
    ]


# ----------------------------------------------------------------------------------------------------
# Lightning: training, checkpoints across layouts, distillation (tests/parallel_lightning_worker.py)


@pytest.mark.slow
def test_lightning_runs_and_checkpoints_across_layouts(tmp_path: Path) -> None:
    run_worker(TESTS / "parallel_lightning_worker.py", [str(tmp_path)], world=2, timeout=240)
    biases = []
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        a, b, c, d = ({int(k): v for k, v in res[x].items()} for x in "ABCD")
        assert sorted(a) == sorted(b) == [0, 1, 2, 3] and sorted(c) == sorted(d) == [2, 3]
        for step in a:  # ep=2 trains exactly like ep=1 (clipping and AdamW included)
            assert abs(a[step] - b[step]) < TOL, (rank, step, a[step], b[step])
        for step in (2, 3):  # saved at ep=2, resumed at ep=1, and the other way round
            assert abs(c[step] - a[step]) < TOL, (rank, step, c[step], a[step])
            assert abs(d[step] - b[step]) < TOL, (rank, step, d[step], b[step])
        assert res["A_experts_after_fit"] == [[4, 32, 128], [2, 32, 128]]  # gathered back after fit
        biases.append(res["A_bias"])  # aux-loss-free balancing moved by the global counts, alike everywhere
        assert res["A_bias"] == res["B_bias"] and any(x != 0 for layer in res["A_bias"] for x in layer)
        e, f = res["E"], res["F"]  # distillation at ep=2 and ep=1
        assert all(abs(e[k] - f[k]) < TOL for k in f) and res["E_teacher_calls"] == res["F_teacher_calls"] > 0
        assert res["E_teacher_experts"] == [[4, 32, 128], [2, 32, 128]]  # half of the teacher's [8, 4]
        assert res["F_teacher_experts"] == [[8, 32, 128], [4, 32, 128]]
    assert biases[0] == biases[1]
    # a checkpoint written at ep=2 looks exactly like one written at ep=1
    ck_a = torch.load(tmp_path / "A" / "step2.ckpt", map_location="cpu", weights_only=True)
    ck_b = torch.load(tmp_path / "B" / "step2.ckpt", map_location="cpu", weights_only=True)
    assert ck_a["state_dict"].keys() == ck_b["state_dict"].keys()
    for key, value in ck_b["state_dict"].items():
        assert ck_a["state_dict"][key].shape == value.shape
        assert (ck_a["state_dict"][key] - value).abs().max() < TOL, key
    opt_a, opt_b = ck_a["optimizer_states"][0]["state"], ck_b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_b:
        for k, v in opt_b[i].items():
            assert opt_a[i][k].shape == v.shape and (opt_a[i][k] - v).abs().max() < TOL, (i, k)
    from distill.train.lm_module import LMModule

    LMModule.load_from_checkpoint(tmp_path / "A" / "step2.ckpt", map_location="cpu")  # one process, strict


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
def test_apps_pretrain_and_distill_with_expert_parallel(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    log = run_app("pretrain", teacher, "model.d_model=32", "model.n_heads=2", "model.max_seq_len=32")
    assert "[pretrain] val loss" in log and "expert_parallel: ep_size=2, world 2" in log
    ckpt = torch.load(teacher / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    shapes = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items() if "experts." in k}
    assert shapes["model.blocks.1.ffn.experts.w_in"][0] == 4 and shapes["model.blocks.3.ffn.experts.w_in"][0] == 8
    from safetensors.torch import load_file

    exported = load_file(teacher / "export" / "model.safetensors")
    assert all(tuple(exported[k.removeprefix("model.")].shape) == s for k, s in shapes.items())

    log = run_app("distill", tmp_path / "student", f"teacher.path={teacher / 'export'}")
    assert "[distill] val loss" in log
    held = re.search(r"teacher loaded; rank 0 holds ([\d,]+) of ([\d,]+) of its expert parameters", log)
    assert held, log[-3000:]
    local, total = (int(x.replace(",", "")) for x in held.groups())
    assert 2 * local == total
