"""The fused, chunked LM head and loss (distill/kd/fused.py): equal to the unfused losses on full logits (values and
gradients of the hidden states and the head weight), a fraction of their peak memory, and the same training step."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from distill.config import OptimConfig
from distill.kd import KDConfig, KDSchedule, kd_loss, teacher_topk
from distill.kd.dense_chunk import CHUNK_BYTES, MIN_ROWS, cache_rows
from distill.kd.fused import TeacherHidden, fused_head_loss
from distill.kd.sparse import lm_sparse_kd_loss
from distill.losses import lm_loss
from distill.models import GPT, ModelConfig
from distill.train.distill_module import DistillModule
from students.config import StudentConfig
from students.mos import derive_student

B, L_SEQ, D, D_T, V = 3, 11, 16, 24, 37
N = B * L_SEQ
MASKED = 24  # valid tokens under the mask: chunks of 4, 8 (and 1, 11, 33 of all N) divide them, 5 and 7 do not
TOL = dict(rtol=1e-5, atol=1e-5)
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.3)]


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L_SEQ, D, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g, dtype=dtype) * 0.5).requires_grad_()
    h_t = torch.randn(B, L_SEQ, D_T, generator=g, dtype=dtype)
    w_t = torch.randn(V + 4, D_T, generator=g, dtype=dtype) * 0.5  # a padded teacher vocabulary: rows sliced
    targets = torch.randint(0, V, (B, L_SEQ), generator=g)
    targets[0, :3] = -100
    targets[2, 5] = -100
    mask = torch.ones(N, dtype=torch.bool)
    mask[torch.randperm(N, generator=g)[:N - MASKED]] = False
    return h, w, h_t, w_t[:V], targets, mask.view(B, L_SEQ)


def close(got, want, what):
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what}: {m}")


def check(fused, ref, h, w, what):
    """Values and gradients (hidden states, head weight) of a fused loss against its unfused reference."""
    g_ref = torch.autograd.grad(ref, (h, w))
    g_fused = torch.autograd.grad(fused, (h, w))
    close(fused, ref, f"{what} value")
    close(g_fused[0], g_ref[0], f"{what} grad hidden")
    close(g_fused[1], g_ref[1], f"{what} grad weight")


@pytest.mark.parametrize("chunk", [1, 4, 5, 11, 64])
@pytest.mark.parametrize("use_mask", [True, False])
def test_ce_alone_equals_lm_loss(chunk, use_mask):
    h, w, _, _, targets, mask = inputs()
    mask = mask if use_mask else None
    fused = fused_head_loss(h, w, targets, mask, chunk_size=chunk)
    ref = lm_loss(h @ w.T, targets, mask)
    check(fused.loss, ref, h, w, "ce")
    close(fused.ce, ref.detach(), "ce term")
    assert fused.kd == 0 and fused.teacher_ce is None and not fused.ce.requires_grad


@pytest.mark.parametrize("chunk", [5, 8, 1024])  # 1024: one chunk
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("teacher_form", ["hidden", "logits"])
def test_ce_and_kd_equal_the_unfused_losses(kind, beta, temperature, chunk, teacher_form):
    h, w, h_t, w_t, targets, mask = inputs()
    t_logits = h_t @ w_t.T
    teacher = TeacherHidden(h_t, w_t) if teacher_form == "hidden" else t_logits
    fused = fused_head_loss(h, w, targets, mask, teacher=teacher, loss=kind, temperature=temperature, beta=beta,
                            chunk_size=chunk, ce_weight=0.7, kd_weight=1.3, teacher_ce=True)
    logits = h @ w.T
    ce = lm_loss(logits, targets, mask)
    kd = kd_loss(logits, t_logits, mask, loss=kind, temperature=temperature, beta=beta, chunk_size=7)
    check(fused.loss, 0.7 * ce + 1.3 * kd, h, w, f"{kind} T={temperature}")
    close(fused.ce, ce.detach(), "ce term")
    close(fused.kd, kd.detach(), "kd term")
    close(fused.teacher_ce, lm_loss(t_logits, targets, mask), "teacher ce")


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("with_targets", [True, False])  # without: no CE at all (its log-softmax is not shared)
def test_kd_alone_without_mask_in_float64(kind, beta, temperature, with_targets):
    h, w, h_t, w_t, targets, _ = inputs(torch.float64)
    fused = fused_head_loss(h, w, targets if with_targets else None, None, teacher=TeacherHidden(h_t, w_t),
                            loss=kind, temperature=temperature, beta=beta, chunk_size=10, ce_weight=0.0, kd_weight=1.0)
    ref = kd_loss(h @ w.T, h_t @ w_t.T, None, loss=kind, temperature=temperature, beta=beta)
    assert fused.loss.dtype == torch.float64
    g_ref, g_fused = torch.autograd.grad(ref, (h, w)), torch.autograd.grad(fused.loss, (h, w))
    for got, want in zip((fused.loss, *g_fused), (ref, *g_ref)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,beta", [k for k in KINDS if k[0] != "reverse_kl"])  # KL(q || 0) is infinite
def test_teacher_logits_with_masked_entries(kind, beta):
    """Teacher logits given whole may hold -inf (a Hugging Face teacher's masked entries): the terms where the
    teacher's probability is 0 are dropped, as in the unfused loss, never 0 * -inf = NaN."""
    h, w, h_t, w_t, targets, mask = inputs()
    t_logits = h_t @ w_t.T
    t_logits[..., 3] = float("-inf")
    t_logits[0, 0, 5:9] = float("-inf")
    fused = fused_head_loss(h, w, targets, mask, teacher=t_logits, loss=kind, beta=beta, chunk_size=5,
                            kd_weight=0.9)
    logits = h @ w.T
    ref = lm_loss(logits, targets, mask) + 0.9 * kd_loss(logits, t_logits, mask, loss=kind, beta=beta)
    assert torch.isfinite(fused.loss)
    check(fused.loss, ref, h, w, f"{kind} with -inf teacher logits")


def test_cpu_chunks_are_capped_to_the_cache():
    """On CPU a chunk holds at most CHUNK_BYTES of fp32 logits (never under MIN_ROWS rows, never over
    kd.chunk_size); the result is the same whatever the chunking (300 rows of an 8,192 vocabulary: 128-row chunks
    and a remainder)."""
    cpu = torch.device("cpu")
    assert cache_rows(1024, 8192, cpu) == MIN_ROWS == 128  # 2 MiB / 32 KiB = 64 rows, raised to the floor
    assert cache_rows(1024, 1000, cpu) == CHUNK_BYTES // 4000 == 524
    assert cache_rows(64, 8192, cpu) == 64 and cache_rows(1024, 8192, torch.device("meta")) == 1024
    g = torch.Generator().manual_seed(3)
    h = torch.randn(300, 8, generator=g).requires_grad_()
    w = (torch.randn(8192, 8, generator=g) * 0.3).requires_grad_()
    h_t, w_t = torch.randn(300, 8, generator=g), torch.randn(8192, 8, generator=g) * 0.3
    targets = torch.randint(0, 8192, (300,), generator=g)
    fused = fused_head_loss(h, w, targets, teacher=TeacherHidden(h_t, w_t), chunk_size=1024)
    logits = h @ w.T
    check(fused.loss, lm_loss(logits, targets) + kd_loss(logits, h_t @ w_t.T, None), h, w, "capped chunks")


@pytest.mark.parametrize("chunk", [4, 7, 1024])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_offline_sparse_targets_equal_lm_sparse_kd_loss(kind, beta, temperature, chunk):
    h, w, h_t, w_t, targets, mask = inputs()
    top = teacher_topk(h_t @ w_t.T, 5, temperature)
    fused = fused_head_loss(h, w, targets, mask, teacher=top, loss=kind, temperature=temperature, beta=beta,
                            chunk_size=chunk, ce_weight=0.6, kd_weight=1.5)
    ce, kd = lm_sparse_kd_loss(h @ w.T, targets, top, mask, loss=kind, temperature=temperature, beta=beta)
    check(fused.loss, 0.6 * ce + 1.5 * kd, h, w, f"sparse {kind} T={temperature}")
    close(fused.ce, ce.detach(), "ce term")
    close(fused.kd, kd.detach(), "kd term")


def test_tied_head_gets_both_gradients():
    """A head tied to the embedding: the gradient reaches the shared parameter through both uses."""
    _, _, h_t, w_t, targets, mask = inputs()
    torch.manual_seed(3)
    emb = torch.nn.Embedding(V, D)
    proj = torch.nn.Linear(D, D)
    ids = torch.randint(0, V, (B, L_SEQ))

    def hidden():
        return torch.tanh(proj(emb(ids)))

    fused = fused_head_loss(hidden(), emb.weight, targets, mask, teacher=TeacherHidden(h_t, w_t), chunk_size=6)
    g_fused = torch.autograd.grad(fused.loss, (emb.weight, proj.weight))
    h = hidden()
    logits = h @ emb.weight.T
    ref = lm_loss(logits, targets, mask) + kd_loss(logits, h_t @ w_t.T, mask)
    g_ref = torch.autograd.grad(ref, (emb.weight, proj.weight))
    close(fused.loss, ref, "tied value")
    close(g_fused[0], g_ref[0], "tied weight grad")
    close(g_fused[1], g_ref[1], "upstream grad")


def test_no_valid_token_gives_zero_and_zero_gradients():
    h, w, h_t, w_t, targets, _ = inputs()
    mask = torch.zeros(B, L_SEQ, dtype=torch.bool)
    fused = fused_head_loss(h, w, targets, mask, teacher=TeacherHidden(h_t, w_t), chunk_size=4)
    assert float(fused.loss) == 0.0
    gh, gw = torch.autograd.grad(fused.loss, (h, w))
    assert not gh.any() and not gw.any()


def test_model_gives_final_hidden_without_logits():
    cfg = ModelConfig.from_dict(dict(name="t", vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=L_SEQ,
                                     num_experts=[4], moe=dict(top_k=1))).validate()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, V, (2, L_SEQ))
    full = model(idx)
    out = model(idx, return_logits=False)
    assert out.logits is None and full.final_hidden is None
    torch.testing.assert_close(model.lm_head(out.final_hidden), full.logits)
    torch.testing.assert_close(out.aux_loss, full.aux_loss)


# ------------------------------------------------------------------------------------------------- peak memory

MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from distill.kd import kd_loss
    from distill.kd.fused import TeacherHidden, fused_head_loss
    from distill.losses import lm_loss
    torch.set_num_threads(1)
    mode, n, v, d, chunk = sys.argv[1], *map(int, sys.argv[2:])

    def make(n, v):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(n, d, generator=g).requires_grad_()
        w = (torch.randn(v, d, generator=g) * 0.1).requires_grad_()
        return h, w, torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.1, torch.randint(0, v, (n,), generator=g)

    def step(h, w, h_t, w_t, tgt):
        if mode == "fused":
            loss = fused_head_loss(h, w, tgt, teacher=TeacherHidden(h_t, w_t), chunk_size=chunk).loss
        else:
            logits = h @ w.T
            with torch.no_grad():
                t_logits = h_t @ w_t.T
            loss = lm_loss(logits, tgt) + kd_loss(logits, t_logits, chunk_size=chunk)
        loss.backward()
        return float(loss)

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    step(*make(64, 1000))  # warm-up on a small problem: libraries and thread pools are in the baseline
    args = make(n, v)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size (VmHWM) starts again from the current one
    base = status("VmRSS")
    assert status("VmHWM") < base + (1 << 20), "the peak resident size was not reset"
    step(*args)
    assert args[0].grad is not None and args[1].grad is not None
    print(status("VmHWM") - base)
""")


def peak_bytes(mode: str, n: int, v: int, d: int, chunk: int) -> int:
    """Peak resident memory a loss step (forward and backward) adds to a fresh process whose inputs exist.

    Linux's high-water mark of resident pages (VmHWM) is reset to the current resident size once the inputs
    are allocated (``5 > /proc/self/clear_refs``) and read after the step: what the step touched at its peak,
    whatever allocated it (autograd's buffers included). glibc's mmap threshold is pinned at 1 MiB, so every
    large tensor lives in its own mapping and goes back to the system when freed: resident memory follows the
    live tensors, not a heap's high-water mark."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, mode, str(n), str(v), str(d), str(chunk)],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1])


def test_fused_peak_memory_is_below_an_eighth_of_the_unfused():
    n, v, d, chunk = 4096, 32000, 64, 256
    unfused = peak_bytes("unfused", n, v, d, chunk)
    fused = peak_bytes("fused", n, v, d, chunk)
    logits = n * v * 4
    assert unfused > 2 * logits, f"the unfused step should hold several [N, V] fp32 tensors: {unfused / 2**20:.0f} MiB"
    assert fused < unfused / 8, f"fused {fused / 2**20:.0f} MiB vs unfused {unfused / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------ the training step

VOCAB, SEQ = 61, 16


class RandomBlocks(Dataset):
    def __init__(self, n: int = 8):
        self.data = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(4))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.ones(SEQ + 1, dtype=torch.bool)
        mask[: 1 + i % 3] = False  # a loss mask over the first positions
        return {"input_ids": self.data[i], "loss_mask": mask}


def one_step(teacher: GPT, fused: bool, **kd) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """A DistillModule's first training step: its logged metrics and the student's gradients."""
    student_cfg = derive_student(teacher.cfg, StudentConfig(n_layers=2))
    torch.manual_seed(7)
    module = DistillModule(student_cfg, OptimConfig(warmup_steps=1, fused_head=fused),
                           KDSchedule(KDConfig(stop_step=None, chunk_size=5, **kd), 1),
                           teacher_loader=lambda: copy.deepcopy(teacher))
    assert module.fused_head() == fused
    grads: dict[str, torch.Tensor] = {}

    class Grads(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            grads.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=1, callbacks=[Grads()])
    trainer.fit(module, DataLoader(RandomBlocks(), batch_size=4))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}, grads


@pytest.mark.parametrize("kd", [dict(loss="jsd", beta=0.3, temperature=2.0, ce_weight=0.5),
                                dict(loss="forward_kl", router_weight=0.5, hidden_weight=0.5)])
def test_distill_step_with_fused_head_equals_switch_off(kd):
    cfg = ModelConfig.from_dict(dict(name="t", vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=2, max_seq_len=SEQ,
                                     num_experts=[2, 4], moe=dict(top_k=1, residual=True))).validate()
    torch.manual_seed(0)
    teacher = GPT(cfg).eval().requires_grad_(False)
    metrics_on, grads_on = one_step(teacher, True, **kd)
    metrics_off, grads_off = one_step(teacher, False, **kd)
    for name in ("train/loss", "train/ce", "train/kd", "teacher/ce", "train/aux"):
        assert metrics_on[name] == pytest.approx(metrics_off[name], rel=1e-5, abs=1e-6), name
    assert set(grads_on) == set(grads_off) and "model.wte.weight" in grads_on
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_on[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_teacher_gives_hidden_states_only_when_asked():
    cfg = ModelConfig.from_dict(dict(name="t", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=SEQ,
                                     num_experts=[2], moe=dict(top_k=1))).validate()
    torch.manual_seed(0)
    teacher = GPT(cfg).eval().requires_grad_(False)
    module = DistillModule(derive_student(cfg, StudentConfig(n_layers=2)), OptimConfig(),
                           KDSchedule(KDConfig(), 1), teacher_loader=lambda: copy.deepcopy(teacher))
    idx = RandomBlocks().data[:2, :-1]
    out = module.teacher_outputs(idx, logits=False)
    assert out.logits is None and out.final_hidden.shape == (2, SEQ, 32)
    side = module.kd_teacher(out)
    torch.testing.assert_close(side.hidden @ side.weight.T, module.teacher_logits(idx))

    class Wrapped(torch.nn.Module):  # a teacher with no hidden-only path (as a Hugging Face one): full logits
        def __init__(self):
            super().__init__()
            self.inner = copy.deepcopy(teacher)

        def forward(self, x):
            return self.inner(x)

    other = DistillModule(derive_student(cfg, StudentConfig(n_layers=2)), OptimConfig(), KDSchedule(KDConfig(), 1),
                          teacher_loader=Wrapped)
    full = other.teacher_outputs(idx, logits=False)
    torch.testing.assert_close(other.kd_teacher(full), module.teacher_logits(idx))
