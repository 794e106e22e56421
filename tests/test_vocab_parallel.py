"""Vocabulary-parallel CE and KD losses (distill/parallel/vocab.py) against the dense losses on the full logits.

Each rank of a 2- and a 4-process gloo job (this file run as a script, one subprocess per rank, killed
at a timeout) builds the same seeded full logits, shards them on the vocabulary over a 1-D tp mesh, and
checks every case below against the dense function applied to the full tensor: per-token and mean
losses, and the gradient w.r.t. the logits (the DTensor gradient's full tensor). Vocabularies of 16
(2 ranks: even slices), 11 (uneven) and 6 entries (4 ranks: the last rank holds none).

    python tests/test_vocab_parallel.py   (RANK, WORLD_SIZE, MASTER_* in env)
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode

from distill.kd import KDConfig, kd_loss, kd_loss_from_config, kl_to_teacher, top1_agreement
from distill.losses import lm_loss
from distill.parallel.launch import run_ranks
from distill.parallel.vocab import VocabShard, vocab_parallel_cross_entropy, vocab_sharded

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("forward_kl", "reverse_kl", "jsd")
B, L = 2, 5
NEG_INF = float("-inf")
TIGHT = dict(rtol=1e-9, atol=1e-12)  # fp64 inputs: only the order of the sums differs
FP32 = dict(rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# helpers (run on every rank)


def logits(vocab: int, seed: int, dtype: torch.dtype = torch.float64, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, L, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)


def valid_mask(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    m = torch.rand(B, L, generator=g) > 0.3
    m[0, 0] = True
    return m


def targets(vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2000)
    t = torch.randint(0, vocab, (B, L), generator=g)
    t[0, 1], t[0, 2], t[1, 0] = 0, vocab - 1, -100  # both ends of the vocabulary, one ignored token
    return t


def dense_value_and_grad(fn: Callable, full: torch.Tensor, scale: float = 3.0):
    x = full.clone().requires_grad_(True)
    value = fn(x)
    (scale * value.sum()).backward()  # an upstream gradient other than 1
    return value.detach(), x.grad


def sharded_value_and_grad(fn: Callable, full: torch.Tensor, mesh, scale: float = 3.0):
    x = distribute_tensor(full.clone(), mesh, [Shard(2)]).requires_grad_(True)
    value = fn(x)
    assert not isinstance(value, DTensor)
    (scale * value.sum()).backward()
    assert isinstance(x.grad, DTensor) and x.grad.placements == (Shard(2),), x.grad
    return value.detach(), x.grad.full_tensor()


def check_same(
    fn_sharded: Callable, fn_dense: Callable, full: torch.Tensor, mesh, tol: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient of the sharded call equal the dense call's; the loss is the same on all ranks."""
    got, got_grad = sharded_value_and_grad(fn_sharded, full, mesh)
    want, want_grad = dense_value_and_grad(fn_dense, full)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_grad, want_grad, **tol)
    everyone = [torch.empty_like(got) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, got.contiguous())
    assert all(torch.equal(e, got) for e in everyone), "ranks disagree on the loss"
    return got, got_grad


def teachers(full: torch.Tensor, mesh) -> dict[str, torch.Tensor]:
    """The teacher's logits as each layout the student's may meet."""
    return {
        "sharded": distribute_tensor(full, mesh, [Shard(2)]),
        "plain": full,
        "replicated": distribute_tensor(full, mesh, [Replicate()]),
    }


# ------------------------------------------------------------------------------------------------
# cases


def case_cross_entropy(mesh, vocab: int) -> None:
    full, t, mask = logits(vocab, 1), targets(vocab, 1), valid_mask(1)
    weights = torch.rand(B * L, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def dense(x):
        return F.cross_entropy(x.reshape(-1, vocab), t.reshape(-1), ignore_index=-100, reduction="none")

    got, _ = check_same(lambda x: vocab_parallel_cross_entropy(x, t) * weights, lambda x: dense(x) * weights,
                        full, mesh, TIGHT)
    assert got[5] == 0 and torch.isfinite(got).all()  # token (1, 0) is ignored
    for m in (None, mask, torch.zeros_like(mask)):
        check_same(lambda x, m=m: lm_loss(x, t, m), lambda x, m=m: lm_loss(x, t, m), full.float(), mesh, FP32)


def case_kd(mesh, vocab: int) -> None:
    student, teacher, mask = logits(vocab, 2), logits(vocab, 3), valid_mask(2)
    for kind in LOSSES:
        for temperature, layouts in ((1.0, ["sharded"]), (2.0, ["sharded", "plain", "replicated"])):
            kw = dict(loss=kind, temperature=temperature, beta=0.3, chunk_size=3)
            for name in layouts:
                t = teachers(teacher, mesh)[name]
                try:
                    check_same(lambda s, t=t, kw=kw: kd_loss(s, t, mask, **kw),
                               lambda s, kw=kw: kd_loss(s, teacher, mask, **kw), student, mesh, TIGHT)
                except AssertionError as err:
                    raise AssertionError(f"{kind}, T={temperature}, teacher {name}: {err}") from None
    cfg = KDConfig(loss="jsd", temperature=2.0, beta=0.3, chunk_size=4)
    t = teachers(teacher, mesh)["sharded"]
    check_same(lambda s: kd_loss_from_config(s, t, mask, cfg), lambda s: kd_loss_from_config(s, teacher, mask, cfg),
               student, mesh, TIGHT)
    got = kl_to_teacher(distribute_tensor(student, mesh, [Shard(2)]), t, mask, chunk_size=2)
    torch.testing.assert_close(got, kl_to_teacher(student, teacher, mask), **TIGHT)
    check_same(lambda s: kd_loss(s, t, torch.zeros_like(mask)), lambda s: kd_loss(s, teacher, torch.zeros_like(mask)),
               student, mesh, TIGHT)
    single = student.float()  # fp32 logits: computed in fp32 on each slice
    check_same(lambda s: kd_loss(s, teacher.float(), mask), lambda s: kd_loss(s, teacher.float(), mask),
               single, mesh, FP32)


def case_neg_inf(mesh, vocab: int) -> None:
    """-inf over all of rank 1's slice in both models (safe for every loss), and over part of rank 0's in
    the model that then has no mass where the other has some."""
    chunk = -(-vocab // mesh.size())
    first, last = slice(0, max(chunk // 2, 1)), slice(chunk, 2 * chunk)
    mask = valid_mask(4)
    for kind in LOSSES:
        student, teacher = logits(vocab, 5), logits(vocab, 6)
        student[..., last], teacher[..., last] = NEG_INF, NEG_INF
        if kind == "forward_kl":  # the teacher has no mass where the student has some: finite
            teacher[0, :, first] = NEG_INF
        elif kind == "reverse_kl":  # the student has no mass where the teacher has some: finite
            student[1, :, first] = NEG_INF
        else:
            teacher[0, :, first] = NEG_INF
            student[1, :, first] = NEG_INF
        kw = dict(loss=kind, temperature=2.0, beta=0.3, chunk_size=3)
        for name in ("sharded", "plain"):
            t = teachers(teacher, mesh)[name]
            got, grad = check_same(lambda s, t=t, kw=kw: kd_loss(s, t, mask, **kw),
                                   lambda s, kw=kw, t=teacher: kd_loss(s, t, mask, **kw), student, mesh, TIGHT)
            assert torch.isfinite(got) and torch.isfinite(grad).all() and (grad[..., last] == 0).all(), (kind, name)


def case_one_slice_holds_the_mass(mesh, vocab: int) -> None:
    """Every other rank's slice is -inf (no mass at all) or far below (mass ~ e^-1000 underflows to 0)."""
    rank = mesh.size() // 2
    shard = VocabShard.of(distribute_tensor(torch.zeros(B, L, vocab), mesh, [Shard(2)]))
    chunk = -(-vocab // mesh.size())
    own = slice(rank * chunk, min((rank + 1) * chunk, vocab))
    assert own.stop > own.start and (shard.offset == own.start) == (mesh.get_local_rank() == rank)
    t = targets(vocab, 7).clamp(max=own.stop - 1).clamp(min=own.start)
    mask = valid_mask(7)
    for fill in (NEG_INF, -1000.0):
        student, teacher = logits(vocab, 8), logits(vocab, 9)
        for x in (student, teacher):
            x[..., : own.start], x[..., own.stop :] = fill, fill
        check_same(lambda x: vocab_parallel_cross_entropy(x, t), lambda x: F.cross_entropy(
            x.reshape(-1, vocab), t.reshape(-1), reduction="none"), student, mesh, TIGHT)
        for kind in LOSSES:
            kw = dict(loss=kind, temperature=2.0, beta=0.3, chunk_size=4)
            t_dt = teachers(teacher, mesh)["sharded"]
            got, _ = check_same(lambda s, kw=kw, t=t_dt: kd_loss(s, t, mask, **kw),
                                lambda s, kw=kw, t=teacher: kd_loss(s, t, mask, **kw), student, mesh, TIGHT)
            assert torch.isfinite(got), (kind, fill)


def case_top1_ties(mesh, vocab: int) -> None:
    """Small integer logits tie often; a few rows tie across slices, one row is all -inf."""
    g = torch.Generator().manual_seed(10)
    student = torch.randint(0, 3, (B, L, vocab), generator=g).double()
    teacher = torch.randint(0, 3, (B, L, vocab), generator=g).double()
    chunk = -(-vocab // mesh.size())
    across = min(chunk, vocab - 1)  # the first entry of rank 1's slice (tp = 1: the last entry)
    for row, where in enumerate([(chunk - 1, across), (vocab - 1, across), (0, vocab - 1)]):
        student[0, row].fill_(0.0)
        student[0, row, list(where)] = 5.0  # the first index of the maximum is on a lower rank
        teacher[0, row].fill_(0.0)
        teacher[0, row, list(where)[::-1]] = 5.0
    student[1, 0] = NEG_INF
    sharded = distribute_tensor(student, mesh, [Shard(2)])
    shard = VocabShard.of(sharded)
    got = shard.argmax(sharded.to_local().flatten(0, -2))
    assert torch.equal(got, student.argmax(-1).flatten()), (got, student.argmax(-1).flatten())
    for m in (None, valid_mask(10)):
        want = top1_agreement(student, teacher, m)
        for name, t in teachers(teacher, mesh).items():
            assert torch.equal(top1_agreement(sharded, t, m), want), name
    assert 0 < float(top1_agreement(student, teacher)) < 1  # ties are broken, not all equal


class ShapeLog(TorchDispatchMode):
    """Shapes of the plain tensors that ops return in new memory (views of their inputs left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in args if type(t) is torch.Tensor}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if type(t) is torch.Tensor and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(t.shape))
        return out


def case_no_full_vocabulary(mesh, vocab: int) -> None:
    """No tensor with the full vocabulary dim is made, forward or backward (the teacher given whole too)."""
    student, teacher, t = logits(vocab, 11), logits(vocab, 12), targets(vocab, 11)
    x = distribute_tensor(student, mesh, [Shard(2)]).requires_grad_(True)
    with ShapeLog() as log:
        kd_loss(x, teacher, loss="jsd", chunk_size=4).backward()
        lm_loss(x, t).backward()
        vocab_parallel_cross_entropy(x, t).sum().backward()
    assert log.shapes and not [s for s in log.shapes if s and s[-1] == vocab], log.shapes


CASES = [case_cross_entropy, case_kd, case_neg_inf, case_one_slice_holds_the_mass, case_top1_ties,
         case_no_full_vocabulary]


def vocabularies(world: int) -> list[int]:
    """Even slices and uneven ones; at 4 ranks also an empty one (torch.chunk of 6 entries: 2, 2, 2, 0)."""
    return [16, 11] if world == 2 else [11, 6]


def worker() -> None:
    """Every case on every rank, in the same order; the first failure ends this rank (its peers then fail
    in their next collective instead of waiting for it)."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    for vocab in vocabularies(mesh.size()):
        for case in CASES:
            print(f"{case.__name__}/V={vocab}", flush=True)
            case(mesh, vocab)
            print("passed", flush=True)
    dist.barrier()  # every rank done before any tears down (a peer leaving early can abort gloo's threads)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_dense(world: int) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve())]
    for rank, (code, out) in enumerate(run_ranks(cmd, world, timeout=150, cwd=ROOT)):
        what = "was killed at the timeout" if code == -9 else f"exited {code}"
        assert code == 0, f"rank {rank} {what}:\n{out[-6000:]}"
        passed = re.findall(r"^(\S+)\npassed$", out, re.MULTILINE)
        assert passed == [f"{c.__name__}/V={v}" for v in vocabularies(world) for c in CASES], out[-6000:]


@pytest.fixture
def one_rank():
    """A 1-process gloo group in this process."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_layouts_other_than_a_vocabulary_shard_are_rejected(one_rank) -> None:
    full, t = logits(8, 0), targets(8, 0)
    mesh, mesh2 = init_device_mesh("cpu", (1,)), init_device_mesh("cpu", (1, 1))
    assert vocab_sharded(full) is False
    assert vocab_sharded(distribute_tensor(full, mesh, [Shard(-1)]))
    bad = [
        distribute_tensor(full, mesh, [Replicate()]),
        distribute_tensor(full, mesh, [Shard(0)]),  # sharded on the batch
        distribute_tensor(full, mesh2, [Replicate(), Shard(2)]),  # on a 2-D mesh
    ]
    for x in bad:
        for call in (vocab_sharded, lambda x: lm_loss(x, t), lambda x: kd_loss(x, full),
                     lambda x: top1_agreement(x, full), lambda x: vocab_parallel_cross_entropy(x, t)):
            with pytest.raises(ValueError, match=r"sharded on the vocabulary, placements \(Shard\(-1\),\) on a 1-D"):
                call(x)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(distribute_tensor(full, mesh, [Shard(2)]), full[..., :-1])


def test_one_rank_mesh_equals_dense(one_rank) -> None:
    """tp = 1: the whole vocabulary is the local slice (no gloo job needed); teachers from inference mode."""
    mesh = init_device_mesh("cpu", (1,))
    for case in (case_cross_entropy, case_kd, case_top1_ties):
        case(mesh, 9)
    student, teacher, t = logits(9, 20), logits(9, 21), targets(9, 20)
    with torch.inference_mode():  # as DistillModule computes the teacher's logits
        frozen = {name: x.clone() for name, x in teachers(teacher.clone(), mesh).items()}
        frozen_ce = lm_loss(frozen["sharded"], t)
    torch.testing.assert_close(frozen_ce, lm_loss(teacher, t), **FP32)
    for name, x in frozen.items():
        check_same(lambda s, x=x: kd_loss(s, x, loss="jsd"), lambda s: kd_loss(s, teacher, loss="jsd"),
                   student, mesh, TIGHT)
        assert torch.equal(top1_agreement(distribute_tensor(student, mesh, [Shard(2)]), x),
                           top1_agreement(student, teacher)), name


if __name__ == "__main__":
    worker()
    # Leave without the interpreter's teardown: once seen in CI, a rank whose every case had passed aborted
    # there ("terminate called without an active exception", exit -6) while destroying gloo's threads.
    sys.stdout.flush()
    os._exit(0)
