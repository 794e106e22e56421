"""The layout planner (`python -m distill.plan`): its arithmetic on hand-computed cases, its activation estimate
against the tensors a real forward saves, the entry point as a user runs it, and its per-rank bytes against
the shards `parallelize` actually gives 4 gloo processes (tests/plan_worker.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plan_worker import BATCH, SEQ, parse_layout, plan_test_config, uniform_routing

from distill.errors import ConfigError
from distill.losses import lm_loss
from distill.models import GPT, ModelConfig
from distill.moe import MoEConfig
from distill.parallel.config import ParallelConfig
from distill.parallel.tensor import check_tensor_parallel
from distill.plan import Share, activation_bytes, meta_model, plan_layout

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def small_config(**changes) -> ModelConfig:
    """Block 0 dense, block 1 a residual MoE layer of 2 experts; every size counted by hand below."""
    cfg = ModelConfig(name="small", vocab_size=16, d_model=8, n_layers=2, n_heads=2, d_ff=16, max_seq_len=8,
                      num_experts=[2], moe=MoEConfig(top_k=1, residual=True))
    return dataclasses.replace(cfg, **changes).validate()


def layout(world: int, **sizes) -> ParallelConfig:
    return ParallelConfig(**sizes).resolve(world)


# ----------------------------------------------------------------------------------------------------
# the arithmetic


def test_every_parameter_counted_once_from_the_meta_model() -> None:
    """One rank holds the whole model: the real model's parameters (built on the CPU), tied head once."""
    for cfg in (small_config(), plan_test_config(), small_config(tie_embeddings=False)):
        real = GPT(cfg)
        plan = plan_layout(cfg, layout(1), 1, cfg.max_seq_len)
        assert plan.rank_params(0) == 4 * sum(p.numel() for p in real.parameters())
        assert (plan.total_params, plan.active_params) == (real.num_params(), real.num_active_params())


def test_tensor_parallelism_halves_the_split_parameters_only() -> None:
    """small_config by hand: tp-split wte 128; block 0 c_attn 192+24, c_proj 64, c_fc 128+16, c_proj 128;
    block 1 c_attn 216, c_proj 64, residual MLP 128+128; experts 256+256. Replicated: norms 5 x 16, row-parallel
    biases 3 x 8, router 16, coef 18."""
    split, replicated, experts = 128 + (216 + 64 + 144 + 128) + (216 + 64 + 256), 5 * 16 + 3 * 8 + 16 + 18, 512
    assert GPT(small_config()).num_params() == split + replicated + experts
    one = plan_layout(small_config(), layout(1), 1, 8)
    two = plan_layout(small_config(), layout(2, tp=2), 1, 8)
    assert one.rank_params(0) == 4 * (split + replicated + experts)
    assert two.rank_params(0) == two.rank_params(1) == 4 * (split // 2 + replicated + experts // 2)


def test_fsdp_shards_like_torch_chunk() -> None:
    """Rank i of n holds torch.chunk's i-th piece (ceil(rows / n) rows, the last ranks fewer or none)."""
    for rows in range(1, 10):
        for n in range(1, 5):
            pieces = [c.shape[0] for c in torch.empty(rows, 3).chunk(n)]
            pieces += [0] * (n - len(pieces))
            share = Share("w", "root", (rows, 3), 0, n)
            assert [share.numel(i) for i in range(n)] == [3 * p for p in pieces]
            assert share.padded == n * 3 * pieces[0]


def test_duplicate_token_dropping_divides_the_all_to_all_by_tp() -> None:
    """tp=2 x ep=2, T = 2 x 8 tokens, top-1 over 2 experts: R = 16 rows of d = 8 fp32 (512 bytes) per layer.
    Flat: each rank sends half of them to the other rank, four times a step (dispatch and combine, forward and
    backward): 4 x 256 bytes. Dropping: 1/tp of that; all-gathers over tp after the dispatch and the combine
    and in the dispatch's backward, reduce-scatters before the combine and in its backward (half the 512 bytes
    each); without it the experts' output and input gradient are all-reduced over tp (512 bytes each)."""
    plan = plan_layout(small_config(), layout(4, tp=2, ep=2, dp_shard=1), 2, 8)
    on, off = plan.comm[True], plan.comm[False]
    assert off["all-to-all ep"] == 4 * 256 and on["all-to-all ep"] == off["all-to-all ep"] / 2
    assert (on["all-gather tp"], on["reduce-scatter tp"]) == (3 * 256, 2 * 256)
    assert (off["all-gather tp"], off["reduce-scatter tp"]) == (0, 0)
    assert off["all-reduce tp"] - on["all-reduce tp"] == 2 * 512
    one = plan_layout(small_config(), layout(2, ep=2, dp_shard=1), 2, 8)  # tp=1: nothing to drop
    assert one.comm[True] == one.comm[False] and one.comm[True]["all-to-all ep"] == 4 * 256
    assert one.comm[True]["all-reduce tp"] == 0


@pytest.mark.parametrize("mode, attn, dense, moe", [("none", 2, 2, 2), ("moe_only", 3, 3, 2), ("full", 3, 3, 3)])
def test_sequence_parallel_turns_the_all_reduces_into_gathers_and_scatters(mode: str, attn: int, dense: int,
                                                                            moe: int) -> None:
    """tp=2 x ep=2, T = 2 x 8 tokens of d = 8 fp32: the residual stream is 512 bytes; over 2 ranks an all-reduce
    moves 512, an all-gather or a reduce-scatter 256. `attn`, `dense`, `moe`: the passes (forward, again when
    recomputed, backward) of each attention, of block 0's dense MLP and of block 1's MoE layer. Without SP the
    residual stream is all-reduced once per pass of each attention and of the dense MLP, after the embedding
    and in the head's backward: moved = 2 x attn + dense + 2 all-reduces; with SP each becomes an all-gather and
    a reduce-scatter (the same bytes). What stays all-reduced: the residual MLP's (moe x 512), the experts'
    without duplicate token dropping (moe x 512), the cross-entropy's (3 x 16 fp32). SP adds only the MoE
    layer's input all-gather per forward and its output gradient's: moe x 256 more bytes over tp."""
    cfg, moved = small_config(), 2 * attn + dense + 2
    base = layout(4, tp=2, ep=2, dp_shard=1, activation_checkpointing=mode)
    off = plan_layout(cfg, base, 2, 8).comm
    on = plan_layout(cfg, dataclasses.replace(base, sequence_parallel=True), 2, 8).comm
    tp_rows = ("all-reduce tp", "all-gather tp", "reduce-scatter tp")
    for dup in (True, False):
        assert on[dup]["all-reduce tp"] == moe * 512 * (1 + (not dup)) + 192
        assert on[dup]["all-reduce tp"] == off[dup]["all-reduce tp"] - moved * 512
        assert on[dup]["all-gather tp"] == off[dup]["all-gather tp"] + moved * 256 + moe * 256
        assert on[dup]["reduce-scatter tp"] == off[dup]["reduce-scatter tp"] + moved * 256
        assert sum(on[dup][k] for k in tp_rows) == sum(off[dup][k] for k in tp_rows) + moe * 256
        assert {k: v for k, v in on[dup].items() if k not in tp_rows} == {
            k: v for k, v in off[dup].items() if k not in tp_rows}
    if mode == "none":  # the whole table, counted by hand (dup. dropping: the experts' 3 gathers, 2 scatters)
        assert (on[True]["all-gather tp"], on[True]["reduce-scatter tp"]) == (3 * 256 + 10 * 256, 2 * 256 + 8 * 256)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["none", "moe_only", "full"])
def test_sequence_parallel_splits_the_norms_and_dropout(mode: str, dropout: float) -> None:
    """small_config at tp=2, T = 16 tokens of d = 8 fp32: a LayerNorm keeps T x d x 4 + 8T = 640 bytes, 320 on
    half the positions (n); a dropout mask T x d = 128 bytes, 64 less (m); a checkpointed input 512, 256 less
    (h). none: 5 norms (ln_1, ln_2 of 2 blocks, ln_f), 5 masks (the embedding's, 2 per block). full: the 2 kept
    block inputs; the recomputed block's 2 norms and 2 masks, ln_f, the embedding's mask. moe_only: the MoE
    block's 2 norms, 2 masks and its attention's kept input, the dense block's kept input; the recomputed
    dense block's 2 norms and 2 masks; ln_f, the embedding's mask. The rest (the linears' all-gathered inputs,
    the MoE layer, the logits) is unchanged."""
    cfg, n, m, h = small_config(dropout=dropout), 320, 64 * (dropout > 0), 256
    less = {"none": 5 * n + 5 * m, "full": 2 * h + 3 * n + 3 * m, "moe_only": 2 * h + 5 * n + 5 * m}[mode]
    lay = layout(2, tp=2, activation_checkpointing=mode)
    off = activation_bytes(meta_model(cfg), lay, 2, 8)
    on = activation_bytes(meta_model(cfg), dataclasses.replace(lay, sequence_parallel=True), 2, 8)
    assert on["total"] < off["total"] and off["total"] - on["total"] == less
    assert off["head"] - on["head"] == n and off["ids and rotary tables"] - on["ids and rotary tables"] == m


def test_sequence_parallel_changes_nothing_at_tp_1() -> None:
    """At tp=1 there is nothing to split: the same plan, the same text."""
    from distill.plan import format_plan

    for sizes in ({"ep": 2, "dp_shard": 1}, {"dp_shard": 2, "activation_checkpointing": "full"}):
        off = plan_layout(small_config(dropout=0.1), layout(2, **sizes), 2, 8)
        on = plan_layout(small_config(dropout=0.1), layout(2, sequence_parallel=True, **sizes), 2, 8)
        assert dataclasses.replace(on, layout=off.layout) == off
        assert format_plan(on) == format_plan(off) and "sequence parallel" not in format_plan(on)
    two = plan_layout(small_config(), layout(2, tp=2, sequence_parallel=True), 2, 8)
    assert "layout tp=2 with sequence parallelism (norms, dropout on T/tp=8 positions)" in format_plan(two)


def test_fsdp_traffic_by_hand() -> None:
    """dp_shard=2 at tp=1: every unit all-gathered in the forward and again in the backward except the root
    (not resharded after the forward), each gradient reduce-scattered once; half of each unit crosses."""
    cfg = small_config()
    plan = plan_layout(cfg, layout(2, dp_shard=2), 1, 8)
    root = 128 + 16  # wte (tied head), ln_f
    blocks = GPT(cfg).num_params() - root
    assert plan.comm[True]["all-gather fsdp"] == 4 * (root + 2 * blocks) / 2
    assert plan.comm[True]["reduce-scatter fsdp"] == 4 * (root + blocks) / 2
    hsdp = plan_layout(cfg, layout(4, dp_replicate=2, dp_shard=2), 1, 8)
    assert hsdp.comm[True]["all-reduce dp"] == 2 * (1 / 2) * 4 * (root + blocks) / 2  # each shard over 2 replicas


def test_hierarchical_all_to_all_messages() -> None:
    """g = 8 ranks, 4 per node: flat 7 messages per all-to-all (4 to the other node); hierarchical 3 within the
    node + 1 across; the same bytes leave the node (4 of the 7 destinations' rows)."""
    cfg = small_config(num_experts=[8], n_layers=2)
    plan = plan_layout(cfg, layout(8, ep=8, dp_shard=1), 2, 8, devices=4)
    (a2a,) = plan.alltoall[True]
    assert (a2a.g, a2a.flat_messages, a2a.flat_cross, a2a.hier_messages, a2a.hier_cross) == (8, 7, 4, 4, 1)
    assert a2a.cross_bytes == pytest.approx(a2a.bytes * 4 / 7)
    (a2a,) = plan_layout(cfg, layout(8, ep=8, dp_shard=1, ep_intra=2), 2, 8).alltoall[True]
    assert (a2a.node, a2a.hier_messages, a2a.hier_cross, a2a.flat_cross) == (2, 1 + 3, 3, 6)
    (a2a,) = plan_layout(cfg, layout(8, ep=8, dp_shard=1), 2, 8, devices=8).alltoall[True]
    assert (a2a.flat_cross, a2a.hier_messages, a2a.cross_bytes) == (0, None, 0)  # one node


def saved_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the tensors a real forward (and the loss) saves for the backward, each storage once, the
    parameters left out; uniform routing, as the planner assumes."""
    torch.manual_seed(0)
    model = GPT(cfg).to(dtype)
    uniform_routing(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids[:, :-1])
        lm_loss(out.logits, ids[:, 1:]) + 0.01 * out.aux_loss + 0.001 * out.z_loss
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["plan_test", "gelu_top1_layernorm", "rmsnorm_gqa_swiglu"])
def test_activation_estimate_matches_the_saved_tensors(name: str, dtype: torch.dtype) -> None:
    """Within 1% of what autograd keeps (the estimate leaves out a few tensors of O(E) or O(batch) elements)."""
    cfg = {
        "plan_test": plan_test_config(),
        "gelu_top1_layernorm": dataclasses.replace(plan_test_config(), moe=MoEConfig(top_k=1, residual=True)),
        "rmsnorm_gqa_swiglu": dataclasses.replace(plan_test_config(), norm="rmsnorm", n_kv_heads=2, bias=False,
                                                  mlp_activation="swiglu", moe=MoEConfig(top_k=2, dropless=True)),
    }[name].validate()
    lay = layout(1, param_dtype=None if dtype == torch.float32 else "bfloat16")
    estimate = activation_bytes(meta_model(cfg), lay, BATCH, SEQ)["total"]
    assert estimate == pytest.approx(saved_bytes(cfg, dtype), rel=0.01)


def test_activation_checkpointing_keeps_less() -> None:
    """full keeps each block's input (T x d fp32 per block) and recomputes one block; moe_only keeps more."""
    cfg, T = plan_test_config(), BATCH * SEQ
    model = meta_model(cfg)
    parts = {mode: activation_bytes(model, layout(1, activation_checkpointing=mode), BATCH, SEQ)
             for mode in ("none", "moe_only", "full")}
    assert parts["full"]["blocks"] == cfg.n_layers * T * cfg.d_model * 4
    assert parts["full"]["total"] < parts["moe_only"]["total"] < parts["none"]["total"]
    assert parts["none"]["recomputed block"] == 0 < parts["full"]["recomputed block"]


# ----------------------------------------------------------------------------------------------------
# bad input


def test_tensor_parallel_sizes_are_checked() -> None:
    check_tensor_parallel(plan_test_config(), 4)
    bad = [(dataclasses.replace(plan_test_config(), n_heads=2), 4, "model.n_heads"),
           (dataclasses.replace(plan_test_config(), n_kv_heads=1), 2, "model.n_kv_heads"),
           (dataclasses.replace(plan_test_config(), vocab_size=50257), 2, "model.vocab_size"),
           (dataclasses.replace(plan_test_config(), d_ff=66), 4, "model.d_ff"),
           (dataclasses.replace(plan_test_config(), moe=MoEConfig(d_ff=30)), 4, "model.moe.d_ff")]
    for cfg, tp, size in bad:
        with pytest.raises(ConfigError) as err:
            check_tensor_parallel(cfg, tp)
        assert err.value.key == "parallel.tp" and size in str(err.value)
    with pytest.raises(ConfigError, match="50432"):  # the vocabulary padded to a multiple of 128 x tp
        check_tensor_parallel(dataclasses.replace(plan_test_config(), vocab_size=50257), 2)


def test_layouts_with_tensor_parallelism_resolve() -> None:
    lay = layout(64, tp=2, ep=8, dp_shard=4)
    assert (lay.dp_replicate, lay.dp_shard, lay.ep, lay.tp) == (1, 4, 8, 2)
    assert layout(8, tp=2).dp_shard == 4  # dp_shard -1: the rest of world / tp
    for sizes, world, key in [({"tp": 3}, 8, "parallel.tp"), ({"tp": 2, "ep": 8, "dp_shard": 8}, 64, "parallel.dp_shard"),
                              ({"tp": 0}, 8, "parallel.tp"), ({"tp": 2, "ep": 3}, 8, "parallel.ep")]:
        with pytest.raises(ConfigError) as err:
            layout(world, **sizes)
        assert err.value.key == key


# ----------------------------------------------------------------------------------------------------
# the entry point, as a user runs it


def run_plan(*overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.plan", *overrides], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def table_bytes(out: str, label: str) -> int:
    line = next(x for x in out.splitlines() if x.strip().startswith(label))
    return int(line.split()[-1].replace(",", ""))


def test_app_prints_the_plan_of_one_process(tmp_path: Path) -> None:
    """model=tiny on one device: the whole model's fp32 bytes, counted from the model built for real; nothing
    is written."""
    from omegaconf import OmegaConf

    proc = run_plan("model=tiny", "trainer.devices=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = ModelConfig.from_dict(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")).validate()
    params = list(GPT(cfg).parameters())
    numel = sum(p.numel() for p in params)
    assert "memory per rank" in proc.stdout and f"({numel:,})" in proc.stdout
    for label in ("parameters (fp32)", "gradients (fp32)"):
        assert table_bytes(proc.stdout, label) == 4 * numel
    assert table_bytes(proc.stdout, "optimizer states") == 8 * numel + 4 * len(params)
    assert list(tmp_path.iterdir()) == []


def test_app_prints_the_communication_of_a_mesh() -> None:
    proc = run_plan("model=tiny", "trainer.devices=4", "parallel.ep=2", "parallel.dp_shard=2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "layout dp_shard=2 x ep=2 on 4 ranks" in out and "largest rank" in out  # uneven shards (coef [2, d])
    assert "all-to-all, 1 layer(s) of 4 experts over g=2" in out and "flat * 1 messages" in out
    assert table_bytes(out, "all-to-all ep") > 0 and "all-gather fsdp" in out


def test_app_refuses_a_layout_that_does_not_fit() -> None:
    """The tables, then one line naming plan.device_memory_gb with the layouts that would fit; exit 2. The limit
    lies between what dp_replicate=4 (nothing sharded) and dp_replicate=2 x dp_shard=2 need."""
    from omegaconf import OmegaConf

    cfg = ModelConfig.from_dict(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")).validate()
    data = OmegaConf.load(ROOT / "conf" / "data" / "stdlib.yaml")  # the plan's default micro-batch
    replicated = plan_layout(cfg, layout(4, dp_replicate=4, dp_shard=1), data.batch_size, data.seq_len).memory.total
    sharded = plan_layout(cfg, layout(4, dp_replicate=2, dp_shard=2), data.batch_size, data.seq_len).memory.total
    assert sharded < replicated
    limit = f"plan.device_memory_gb={(sharded + replicated) / 2 / 2**30:.6f}"
    proc = run_plan("model=tiny", "trainer.devices=4", "parallel.dp_replicate=4", "parallel.dp_shard=1", limit)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "does NOT fit" in proc.stdout and "communication per rank" in proc.stdout
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("distill: error: config key `plan.device_memory_gb`")
    assert "parallel.dp_replicate=2 parallel.dp_shard=2" in err  # grow dp_shard: it fits
    ok = run_plan("model=tiny", "trainer.devices=4", "parallel.dp_replicate=2", "parallel.dp_shard=2", limit)
    assert ok.returncode == 0 and " fits" in ok.stdout


@pytest.mark.parametrize("overrides, key", [
    (["trainer.devices=4", "parallel.ep=3"], "parallel.ep"),  # does not divide the world
    (["parallel.drop_duplicate_tokenz=true"], "parallel.drop_duplicate_tokenz"),  # Hydra's own error
])
def test_app_names_the_bad_key(overrides: list[str], key: str) -> None:
    proc = run_plan("model=tiny", *overrides)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"config key `{key}`" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("overrides, key", [
    (["trainer.devices=4", "parallel.ep=4", "parallel.dp_shard=1", "model.num_experts=[4,6]"], "model.num_experts"),
    (["trainer.devices=4", "parallel.tp=4", "parallel.dp_shard=1", "model.n_heads=2"], "parallel.tp"),
    (["trainer.devices=4", "trainer.num_nodes=2", "parallel.ep=4", "parallel.tp=2", "parallel.dp_shard=1",
      "parallel.ep_intra=4"], "parallel.ep_intra"),  # a node holds 2 of the group's ranks (4 devices / tp)
    (["data.seq_len=256"], "data.seq_len"),  # tiny: max_seq_len 128
    (["trainer.devices=2", "parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=127"], "data.seq_len"),
    (["trainer.devices=auto"], "trainer.devices"),
    (["plan.device_memory_gb=-1"], "plan.device_memory_gb"),
    (["model.moe.top_k=9"], "model.moe.top_k"),  # the model's own checks
])
def test_resolve_plan_names_the_bad_key(overrides: list[str], key: str) -> None:
    from hydra import compose, initialize_config_dir

    from distill.plan import resolve_plan

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="plan", overrides=["model=tiny", *overrides])
    with pytest.raises(ConfigError) as err:
        resolve_plan(cfg)
    assert err.value.key == key


# ----------------------------------------------------------------------------------------------------
# against the shards parallelize gives 4 processes (tests/plan_worker.py)


def tensor_parallel_available() -> bool:
    try:
        ParallelConfig(tp=2).resolve(2)
    except ConfigError:
        return False
    return True


LAYOUTS = ["ep=2,dp_shard=2", "ep=4,dp_shard=1", "dp_shard=4", "dp_replicate=2,ep=2,dp_shard=1",
           "ep=4,dp_shard=1,ep_intra=2"]
TP_LAYOUTS = ["tp=2,ep=2,dp_shard=1", "tp=2,dp_shard=2", "tp=4,dp_shard=1"]
needs_tp = pytest.mark.skipif(not tensor_parallel_available(), reason="parallel.tp > 1 is not implemented yet")


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distill.parallel.launch import run_ranks

    out = tmp_path_factory.mktemp("plan")
    layouts = LAYOUTS + (TP_LAYOUTS if tensor_parallel_available() else [])
    cmd = [sys.executable, str(TESTS / "plan_worker.py"), str(out), ";".join(layouts)]
    for rank, (code, text) in enumerate(run_ranks(cmd, 4, timeout=180, cwd=ROOT)):
        assert code == 0, f"plan_worker rank {rank} exited {code}:\n{text[-4000:]}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("text", [*LAYOUTS, *(pytest.param(t, marks=needs_tp) for t in TP_LAYOUTS)])
def test_plan_matches_measured_shards(measured: Path, text: str) -> None:
    """Every rank's parameter, gradient and AdamW bytes equal the planner's prediction for that rank (the
    table's column is the largest rank); the forward's dispatches send the planner's all-to-all bytes and
    messages (uniform routing; nodes of parallel.ep_intra ranks, else every other rank), and under tensor
    parallelism the experts' all-gathers and reduce-scatters over tp move the planner's bytes."""
    lay = parse_layout(text).resolve(4)
    plan = plan_layout(plan_test_config(), lay, BATCH, SEQ)
    ranks = [json.loads((measured / f"{text.replace(',', '_').replace('=', '')}-rank{r}.json").read_text())
             for r in range(4)]
    for r, got in enumerate(ranks):
        assert got["params"] == plan.rank_params(r), (r, got["params"], plan.rank_params(r))
        assert got["grads"] == got["params"] and got["moments"] == 2 * got["params"]
        assert got["steps"] == 4 * got["step_tensors"] == 4 * len(plan.shares)
    assert max(r["params"] for r in ranks) == plan.memory.params
    assert max(r["moments"] + r["steps"] for r in ranks) == plan.memory.optimizer
    a2a = plan.alltoall[bool(getattr(lay, "drop_duplicate_tokens", True))]
    if lay.ep_intra:
        expected = (sum(a.cross_bytes * a.layers for a in a2a),
                    sum((a.hier_cross if a.hier_cross is not None else a.flat_cross) * a.layers for a in a2a))
    else:
        expected = (sum(a.bytes * a.layers for a in a2a), sum(a.flat_messages * a.layers for a in a2a))
    for got in ranks:
        assert (got["traffic_bytes"], got["traffic_messages"]) == expected
    if lay.tp > 1:  # the forward's share of the experts' tp collectives: all-gathers 2 of 3, reduce-scatters 1 of 2
        other = [r["traffic_other"] for r in ranks]
        assert all(o.get("tp_all_gather", 0) == plan.comm[True]["all-gather tp"] * 2 / 3 for o in other), other
        assert all(o.get("tp_reduce_scatter", 0) == plan.comm[True]["reduce-scatter tp"] / 2 for o in other), other
    if text == "ep=4,dp_shard=1":
        assert expected[0] > 0 and len({r["params"] for r in ranks}) > 1  # something moved; uneven shards
    if text == "tp=2,ep=2,dp_shard=1":  # duplicate token dropping ran
        assert plan.comm[True]["all-gather tp"] > 0 and expected[0] == sum(a.bytes for a in plan.alltoall[False]) / 2
