"""Sparse (top-k + tail) KD targets: k = V against the dense `kd_loss`, k < V against a naive per-token
reference on explicit (k + 1)-bucket distributions, properties, -inf safety, `teacher_topk`."""

from __future__ import annotations

import math

import pytest
import torch

from distill.errors import ConfigError
from distill.kd.losses import kd_loss
from distill.kd.sparse import TopK, sparse_kd_loss, teacher_topk

NEG_INF = float("-inf")
# (loss, beta): forward KL, reverse KL, symmetric JSD and a skewed generalised JSD
CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.3)]


def _logits(seed: int, shape=(2, 7, 13), dtype=torch.float64, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _mask(shape=(2, 7)) -> torch.Tensor:
    mask = torch.ones(shape, dtype=torch.bool)
    mask[0, 1] = mask[0, 5] = mask[1, 0] = mask[1, 6] = False
    return mask


# ------------------------------------------------------------------------------------------------
# naive reference: one token at a time, explicit bucket distributions, textbook formulas, float64


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a_j log(a_j / b_j) over buckets with a_j > 0."""
    return sum(
        (a[j] * torch.log(a[j] / b[j]) for j in range(a.numel()) if a[j] > 0), torch.zeros((), dtype=a.dtype)
    )


def naive(student, teacher, mask, k, kind, temperature=1.0, beta=0.5):
    vocab = student.shape[-1]
    s, t = student.reshape(-1, vocab).double(), teacher.reshape(-1, vocab).double()
    valid = mask.reshape(-1).tolist() if mask is not None else [True] * s.shape[0]
    total, n = torch.zeros((), dtype=torch.float64), 0
    for i in range(s.shape[0]):
        if not valid[i]:
            continue
        pt, q = torch.softmax(t[i] / temperature, -1), torch.softmax(s[i] / temperature, -1)
        order = torch.argsort(pt, descending=True)
        top, rest = order[:k], order[k:]  # the tail: the sum of the other probabilities (no 1 - sum)
        p_b = torch.cat([pt[top], pt[rest].sum()[None]])
        q_b = torch.cat([q[top], q[rest].sum()[None]])
        if kind == "forward_kl":
            d = _kl(p_b, q_b)
        elif kind == "reverse_kl":
            d = _kl(q_b, p_b)
        else:
            m = beta * p_b + (1 - beta) * q_b
            d = beta * _kl(p_b, m) + (1 - beta) * _kl(q_b, m)
        total, n = total + d * temperature**2, n + 1
    return total / max(n, 1)


def _loss_and_grad(fn, student: torch.Tensor):
    x = student.detach().clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad(out, x)
    return out.detach(), grad


# ------------------------------------------------------------------------------------------------
# k = V: exactly the dense loss


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", CASES)
def test_full_k_equals_dense_kd_loss(kind, beta, temperature, dtype, tol):
    student, teacher, mask = _logits(0, dtype=dtype), _logits(1, dtype=dtype), _mask()
    targets = teacher_topk(teacher, teacher.shape[-1], temperature)
    kw = dict(loss=kind, temperature=temperature, beta=beta)
    sparse, g_sparse = _loss_and_grad(lambda x: sparse_kd_loss(x, targets, mask, chunk_size=3, **kw), student)
    dense, g_dense = _loss_and_grad(lambda x: kd_loss(x, teacher, mask, **kw), student)
    assert dense > 0.01
    assert abs(sparse.item() - dense.item()) < tol
    assert g_sparse.dtype == dtype and torch.allclose(g_sparse, g_dense, atol=tol, rtol=0)
    assert g_sparse[~mask].abs().max() == 0


# ------------------------------------------------------------------------------------------------
# k < V: the naive bucket reference, value and gradient


@pytest.mark.parametrize("k", [1, 4, 12])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", CASES)
def test_topk_matches_naive_reference(kind, beta, temperature, k):
    student, teacher, mask = _logits(2), _logits(3), _mask()
    targets = teacher_topk(teacher, k, temperature)
    kw = dict(loss=kind, temperature=temperature, beta=beta)
    got, g_got = _loss_and_grad(lambda x: sparse_kd_loss(x, targets, mask, chunk_size=4, **kw), student)
    ref, g_ref = _loss_and_grad(lambda x: naive(x, teacher, mask, k, kind, temperature, beta), student)
    assert abs(got.item() - ref.item()) < 1e-10
    assert torch.allclose(g_got, g_ref, atol=1e-10, rtol=0)
    # collapsing buckets never increases the divergence (log-sum inequality)
    assert got <= kd_loss(student, teacher, mask, **kw) + 1e-12


def test_no_grad_path_and_flat_input_agree():
    student, teacher, mask = _logits(4), _logits(5), _mask()
    targets = teacher_topk(teacher, 5)
    with_grad = sparse_kd_loss(student.clone().requires_grad_(True), targets, mask, loss="jsd")
    with torch.no_grad():
        plain = sparse_kd_loss(student, targets, mask, loss="jsd")
    flat = TopK(targets.ids.flatten(0, 1), targets.logp.flatten(0, 1), targets.tail.flatten())
    flat_loss = sparse_kd_loss(student.flatten(0, 1), flat, mask.flatten(), loss="jsd")
    assert abs(with_grad.item() - plain.item()) < 1e-12 and abs(flat_loss.item() - plain.item()) < 1e-12


# ------------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("kind,beta", CASES)
def test_nonnegative_and_zero_at_teacher(kind, beta):
    vocab = 13
    for seed in range(6):
        student, teacher = _logits(10 + seed, scale=4.0), _logits(20 + seed, scale=4.0)
        for k in (1, 3, vocab - 1, vocab):
            for temperature in (0.5, 1.0, 3.0):
                targets = teacher_topk(teacher, k, temperature)
                kw = dict(loss=kind, temperature=temperature, beta=beta)
                assert sparse_kd_loss(student, targets, **kw) >= 0
                assert abs(sparse_kd_loss(teacher, targets, **kw).item()) < 1e-12
                if kind == "jsd":  # bounded by the binary entropy H(beta), times T^2
                    bound = -(beta * math.log(beta) + (1 - beta) * math.log1p(-beta)) * temperature**2
                    assert sparse_kd_loss(student, targets, **kw) <= bound + 1e-12


@pytest.mark.parametrize("beta", [0.5, 0.3])
def test_jsd_bound_reached_for_disjoint_buckets(beta):
    teacher = torch.full((1, 6), NEG_INF, dtype=torch.float64)
    teacher[0, 0] = 0.0  # all teacher mass on token 0 (top-1, empty tail)
    student = torch.full((1, 6), NEG_INF, dtype=torch.float64)
    student[0, 3:] = 0.0  # all student mass in the tail
    got = sparse_kd_loss(student, teacher_topk(teacher, 1), loss="jsd", beta=beta)
    assert abs(got.item() + beta * math.log(beta) + (1 - beta) * math.log1p(-beta)) < 1e-12


@pytest.mark.parametrize("k", [2, 5, 6, 9])
@pytest.mark.parametrize("kind,beta", CASES)
def test_inf_logits_where_both_agree_are_finite(kind, beta, k):
    """Both models put -inf on the same entries: inside the top-k (k > finite count), in the tail, and
    (k = 5 finite entries) an empty tail on both sides."""
    student, teacher = _logits(30, shape=(3, 9)), _logits(31, shape=(3, 9))
    dead = torch.tensor([1, 4, 7, 8])
    student[:, dead], teacher[:, dead] = NEG_INF, NEG_INF
    targets = teacher_topk(teacher, k, 2.0)
    loss, grad = _loss_and_grad(
        lambda x: sparse_kd_loss(x, targets, loss=kind, temperature=2.0, beta=beta), student
    )
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[:, dead].abs().max() == 0
    ref, g_ref = _loss_and_grad(lambda x: naive(x, teacher, None, k, kind, 2.0, beta), student)
    assert abs(loss.item() - ref.item()) < 1e-10 and torch.allclose(grad, g_ref, atol=1e-10)


def test_forward_kl_infinite_where_student_misses_teacher_mass():
    student, teacher = _logits(40, shape=(1, 6)), _logits(41, shape=(1, 6))
    targets = teacher_topk(teacher, 2)
    student[0, targets.ids[0, 0]] = NEG_INF
    assert sparse_kd_loss(student, targets) == math.inf
    assert torch.isfinite(sparse_kd_loss(student, targets, loss="jsd"))


def test_no_valid_token_gives_zero_with_a_gradient():
    student = _logits(42).requires_grad_(True)
    loss = sparse_kd_loss(student, teacher_topk(_logits(43), 3), torch.zeros(2, 7, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and student.grad is not None and student.grad.abs().max() == 0


def test_low_precision_student_computes_in_fp32():
    student, teacher, mask = _logits(44, dtype=torch.bfloat16), _logits(45), _mask()
    x = student.clone().requires_grad_(True)
    loss = sparse_kd_loss(x, teacher_topk(teacher.float(), 4), mask, loss="reverse_kl")
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref = naive(student.double(), teacher.float().double(), mask, 4, "reverse_kl")
    assert abs(loss.item() - ref.item()) < 1e-5


# ------------------------------------------------------------------------------------------------
# teacher_topk and argument checks


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_teacher_topk_sorted_with_tail(temperature):
    teacher = _logits(50)
    log_p = torch.log_softmax(teacher / temperature, -1)
    for k in (1, 4, 12):
        ids, logp, tail = teacher_topk(teacher, k, temperature)
        assert ids.shape == logp.shape == (2, 7, k) and tail.shape == (2, 7) and ids.dtype == torch.long
        assert (logp[..., :-1] >= logp[..., 1:]).all()
        assert torch.equal(logp, log_p.gather(-1, ids))
        assert torch.equal(logp, log_p.sort(-1, descending=True).values[..., :k])
        # log(1 - sum p_topk) cancels for small tails (error ~1e-16 / tail); the sum of the rest does not
        assert torch.allclose(tail, torch.log(1 - logp.exp().sum(-1)), atol=1e-8, rtol=0)
        rest = log_p.exp().scatter(-1, ids, 0.0).sum(-1).log()
        assert torch.allclose(tail, rest, atol=1e-12, rtol=0)
    full = teacher_topk(teacher, 13, temperature)
    assert (full.tail == NEG_INF).all() and torch.equal(
        full.ids.sort(-1).values, torch.arange(13).expand(2, 7, 13)
    )


def test_teacher_topk_tiny_tail_is_accurate_in_fp32():
    teacher = torch.zeros(1, 50)
    teacher[0, 0] = 60.0  # the tail mass is 49 e^-60 ~ 4e-25, far below fp32's epsilon
    tail = teacher_topk(teacher, 1).tail
    assert tail.dtype == torch.float32 and abs(tail.item() - (math.log(49) - 60)) < 1e-4


def test_bad_arguments_raise():
    teacher, student = _logits(60), _logits(61)
    for k in (0, -1, 14):
        with pytest.raises(ValueError, match="top-k"):
            teacher_topk(teacher, k)
    good = teacher_topk(teacher, 3)
    too_many = TopK(torch.arange(14).expand(2, 7, 14), torch.zeros(2, 7, 14), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="top-k"):
        sparse_kd_loss(student, too_many)
    with pytest.raises(ValueError):
        sparse_kd_loss(student[:, :5], good)
    with pytest.raises(ValueError, match="mask"):
        sparse_kd_loss(student, good, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ConfigError):
        sparse_kd_loss(student, good, loss="kl")
    with pytest.raises(ConfigError):
        sparse_kd_loss(student, good, loss="jsd", beta=1.0)
    with pytest.raises(ValueError):
        teacher_topk(teacher, 3, temperature=0.0)


# ------------------------------------------------------------------------------------------------
# the cross-entropy fused with the sparse KD loss (one pass over the vocabulary)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", CASES)
def test_fused_ce_and_kd_equal_the_separate_losses(kind, beta, temperature):
    """Values and the gradient of any weighted sum equal lm_loss + the naive bucket reference (float64),
    with a mask, an ignored target, a target inside and outside the top-k and a chunk that does not
    divide the token count."""
    from distill.kd.sparse import lm_sparse_kd_loss
    from distill.losses import lm_loss

    student, teacher, mask = _logits(60), _logits(61), _mask()
    lm_targets = torch.randint(0, 13, (2, 7), generator=torch.Generator().manual_seed(0))
    lm_targets[1, 3] = -100
    targets = teacher_topk(teacher, 4, temperature)
    lm_targets[0, 2] = targets.ids[0, 2, 0]  # a target inside the top-k
    kw = dict(loss=kind, temperature=temperature, beta=beta)
    x = student.clone().requires_grad_(True)
    ce, kd = lm_sparse_kd_loss(x, lm_targets, targets, mask, chunk_size=4, **kw)
    (0.3 * ce + 1.7 * kd).backward()
    y = student.clone().requires_grad_(True)
    valid = mask & (lm_targets != -100)  # the CE in float64 (lm_loss computes in fp32)
    ce_ref = -torch.log_softmax(y, -1)[valid].gather(-1, lm_targets[valid][:, None]).mean()
    kd_ref = naive(y, teacher, mask, 4, kind, temperature, beta)
    (0.3 * ce_ref + 1.7 * kd_ref).backward()
    assert abs(ce.item() - ce_ref.item()) < 1e-10 and abs(kd.item() - kd_ref.item()) < 1e-10
    assert abs(ce.item() - lm_loss(student, lm_targets, mask).item()) < 1e-5
    assert torch.allclose(x.grad, y.grad, atol=1e-10, rtol=0)
    assert x.grad[~mask].abs().max() == 0


def test_fused_ce_in_fp32_and_bf16_matches_lm_loss():
    from distill.kd.sparse import lm_sparse_kd_loss
    from distill.losses import lm_loss

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        student = _logits(62, shape=(3, 5, 50), dtype=dtype)
        lm_targets = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))
        targets = teacher_topk(_logits(63, shape=(3, 5, 50)).float(), 8)
        x, y = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
        ce, kd = lm_sparse_kd_loss(x, lm_targets, targets)
        ce.backward()
        ref = lm_loss(y, lm_targets)
        ref.backward()
        assert ce.dtype == torch.float32 and x.grad.dtype == dtype
        assert abs(ce.item() - ref.item()) < tol
        assert torch.allclose(x.grad.float(), y.grad.float(), atol=tol)
