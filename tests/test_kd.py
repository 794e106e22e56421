"""KD losses against a naive per-token reference, chunking, -inf safety, the staged schedule, the configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError
from torch.utils._python_dispatch import TorchDispatchMode

from distill.errors import ConfigError
from distill.kd import (
    KDConfig,
    KDSchedule,
    kd_loss,
    kd_loss_from_config,
    kl_to_teacher,
    top1_agreement,
)

LOSSES = ("forward_kl", "reverse_kl", "jsd")
CONF_KD = Path(__file__).resolve().parents[1] / "conf" / "kd"
NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------
# naive reference: plain probabilities, a Python loop over tokens, float64


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a_v log(a_v / b_v) over entries with a_v > 0."""
    keep = a > 0
    return (a[keep] * (torch.log(a[keep]) - torch.log(b[keep]))).sum()


def reference(student, teacher, mask, kind, temperature=1.0, beta=0.5):
    vocab = student.shape[-1]
    s, t = student.reshape(-1, vocab).double(), teacher.detach().reshape(-1, vocab).double()
    valid = [True] * s.shape[0] if mask is None else mask.reshape(-1).tolist()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(s.shape[0]):
        if not valid[i]:
            continue
        q = torch.softmax(s[i] / temperature, dim=-1)
        p = torch.softmax(t[i] / temperature, dim=-1)
        if kind == "forward_kl":
            d = _kl(p, q)
        elif kind == "reverse_kl":
            d = _kl(q, p)
        else:
            m = beta * p + (1 - beta) * q
            d = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
        total = total + temperature**2 * d
        count += 1
    return total / count if count else total


def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _mask(shape, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    m = torch.rand(*shape, generator=g) > 0.3
    m.view(-1)[0] = True
    return m


def _value_and_grad(fn, student, teacher):
    student = student.clone().requires_grad_(True)
    value = fn(student, teacher)
    value.backward()
    return value.detach(), student.grad


# ------------------------------------------------------------------------------------------------
# losses


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_matches_reference_value_and_grad(kind, temperature):
    student, teacher, mask = _logits(2, 5, 11, seed=1), _logits(2, 5, 11, seed=2), _mask((2, 5))
    kw = dict(loss=kind, temperature=temperature, beta=0.3, chunk_size=3)
    got, got_grad = _value_and_grad(lambda s, t: kd_loss(s, t, mask, **kw), student, teacher)
    want, want_grad = _value_and_grad(
        lambda s, t: reference(s, t, mask, kind, temperature, 0.3), student, teacher
    )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    assert got > 0


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_neg_inf_logits_finite_and_match_reference(kind, temperature):
    student, teacher, mask = _logits(3, 4, 9, seed=3), _logits(3, 4, 9, seed=4), _mask((3, 4), seed=5)
    student[..., -2:] = NEG_INF  # masked vocabulary entries, shared by both models
    teacher[..., -2:] = NEG_INF
    if kind == "forward_kl":  # teacher has no mass where the student has some: finite
        teacher[..., 0] = NEG_INF
    elif kind == "reverse_kl":  # student has no mass where the teacher has some: finite
        student[..., 0] = NEG_INF
    else:  # JSD stays finite either way
        teacher[0, :, 0] = NEG_INF
        student[1, :, 1] = NEG_INF
    kw = dict(loss=kind, temperature=temperature, chunk_size=2)
    got, got_grad = _value_and_grad(lambda s, t: kd_loss(s, t, mask, **kw), student, teacher)
    want, want_grad = _value_and_grad(lambda s, t: reference(s, t, mask, kind, temperature), student, teacher)
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    assert (got_grad[..., -2:] == 0).all()


@pytest.mark.parametrize("kind", LOSSES)
def test_padding_is_excluded_even_with_nan_logits(kind):
    student, teacher = _logits(2, 6, 7, seed=6), _logits(2, 6, 7, seed=7)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, :2] = True
    padded_s, padded_t = student.clone(), teacher.clone()
    padded_s[~mask] = float("nan")  # whatever sits in padding must not matter
    padded_t[~mask] = NEG_INF
    got, grad = _value_and_grad(lambda s, t: kd_loss(s, t, mask, loss=kind), padded_s, padded_t)
    # mean over the 6 valid tokens, not over 12 positions
    want = kd_loss(student[mask], teacher[mask], loss=kind)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert (grad[~mask] == 0).all() and torch.isfinite(grad[mask]).all()


@pytest.mark.parametrize("kind", LOSSES)
def test_chunked_equals_unchunked(kind):
    student = _logits(3, 7, 13, seed=8).float()
    teacher = _logits(3, 7, 13, seed=9).float()
    mask = _mask((3, 7), seed=10)
    n = 21
    results = [
        _value_and_grad(lambda s, t, c=c: kd_loss(s, t, mask, loss=kind, chunk_size=c), student, teacher)
        for c in (1, 3, n, 4 * n)
    ]
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-7)


def test_shapes_bld_and_nd_agree():
    student, teacher = _logits(2, 5, 8, seed=11), _logits(2, 5, 8, seed=12)
    mask = _mask((2, 5), seed=13)
    a = kd_loss(student, teacher, mask, loss="jsd")
    b = kd_loss(student.reshape(10, 8), teacher.reshape(10, 8), mask.reshape(10), loss="jsd")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = kd_loss(student, teacher, mask.long(), loss="jsd")  # 0/1 masks work too
    torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("temperature", [0.7, 3.0])
def test_zero_when_student_equals_teacher(kind, temperature):
    logits = _logits(2, 4, 10, seed=14)
    logits[..., 3] = NEG_INF
    value, grad = _value_and_grad(
        lambda s, t: kd_loss(s, t, loss=kind, temperature=temperature), logits, logits.clone()
    )
    assert abs(value.item()) < 1e-12
    assert grad.abs().max().item() < 1e-12


def test_jsd_symmetric_at_half_and_bounded():
    a, b = _logits(4, 6, 12, seed=15, scale=6.0), _logits(4, 6, 12, seed=16, scale=6.0)
    ab = kd_loss(a, b, loss="jsd", beta=0.5)
    ba = kd_loss(b, a, loss="jsd", beta=0.5)
    torch.testing.assert_close(ab, ba, rtol=1e-12, atol=0)
    assert 0 < ab.item() <= math.log(2)
    assert kd_loss(a, b, loss="jsd", beta=0.5, temperature=2.0).item() <= 4 * math.log(2)
    # disjoint supports reach the bound: log 2 at beta = 0.5, the binary entropy H(beta) in general
    teacher = torch.full((3, 5), NEG_INF, dtype=torch.float64)
    student = teacher.clone()
    teacher[:, 0] = 0.0
    student[:, 1:] = 0.0
    for beta in (0.5, 0.2, 0.9):
        value = kd_loss(student, teacher, loss="jsd", beta=beta)
        entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert value.item() == pytest.approx(entropy, rel=1e-12)
        assert torch.isfinite(value)


def test_teacher_gets_no_gradient_and_inference_mode_teacher_works():
    student = _logits(2, 3, 6, seed=17).requires_grad_(True)
    teacher = _logits(2, 3, 6, seed=18).requires_grad_(True)
    kd_loss(student, teacher, loss="reverse_kl").backward()
    assert teacher.grad is None and student.grad is not None
    # the teacher runs under torch.inference_mode(): its logits are inference tensors
    with torch.inference_mode():
        frozen = _logits(2, 3, 6, seed=18) * 1.0
    student.grad = None
    kd_loss(student, frozen, loss="forward_kl").backward()
    assert torch.isfinite(student.grad).all()
    # and the whole call under inference mode (Lightning's validation) works
    with torch.inference_mode():
        assert torch.isfinite(kd_loss(student, frozen))


def test_no_valid_tokens_gives_zero_with_grad():
    student = _logits(2, 3, 5, seed=19).requires_grad_(True)
    teacher = _logits(2, 3, 5, seed=20)
    value = kd_loss(student, teacher, torch.zeros(2, 3, dtype=torch.bool), loss="jsd")
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert (student.grad == 0).all()


def test_bf16_inputs_upcast_per_chunk():
    student = _logits(4, 5, 16, seed=21).to(torch.bfloat16)
    teacher = _logits(4, 5, 16, seed=22).to(torch.bfloat16)
    mask = _mask((4, 5), seed=23)
    value, grad = _value_and_grad(lambda s, t: kd_loss(s, t, mask, chunk_size=4), student, teacher)
    want, want_grad = _value_and_grad(lambda s, t: reference(s, t, mask, "forward_kl"), student, teacher)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad.double(), rtol=2e-2, atol=1e-4)  # bf16 gradients


class _RecordFloat32(TorchDispatchMode):
    """Records the largest number of elements of any fp32 tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", LOSSES)
def test_no_full_size_fp32_tensor(kind):
    tokens, vocab, chunk = 24, 32, 4
    student = _logits(tokens, vocab, seed=24).to(torch.bfloat16).requires_grad_(True)
    teacher = _logits(tokens, vocab, seed=25).to(torch.bfloat16)
    with _RecordFloat32() as rec:
        kd_loss(student, teacher, loss=kind, chunk_size=chunk).backward()
    assert 0 < rec.largest <= chunk * vocab
    assert student.grad.shape == (tokens, vocab)


def test_from_config_and_metrics():
    student, teacher, mask = _logits(2, 5, 9, seed=26), _logits(2, 5, 9, seed=27), _mask((2, 5), seed=28)
    cfg = KDConfig(loss="reverse_kl", temperature=2.0, chunk_size=2)
    torch.testing.assert_close(
        kd_loss_from_config(student, teacher, mask, cfg), reference(student, teacher, mask, "reverse_kl", 2.0)
    )
    torch.testing.assert_close(
        kl_to_teacher(student, teacher, mask), reference(student, teacher, mask, "forward_kl", 1.0)
    )
    agree = [
        int(student[b, i].argmax() == teacher[b, i].argmax())
        for b in range(2)
        for i in range(5)
        if mask[b, i]
    ]
    assert top1_agreement(student, teacher, mask).item() == pytest.approx(sum(agree) / len(agree))
    assert top1_agreement(student, student.clone(), mask).item() == 1.0
    assert top1_agreement(student, teacher, torch.zeros_like(mask)).item() == 0.0


def test_bad_loss_arguments_name_the_key():
    s, t = _logits(2, 4), _logits(2, 4, seed=1)
    for kwargs, key in [
        (dict(loss="kl"), "kd.loss"),
        (dict(temperature=0.0), "kd.temperature"),
        (dict(beta=1.0, loss="jsd"), "kd.beta"),
        (dict(chunk_size=0), "kd.chunk_size"),
    ]:
        with pytest.raises(ConfigError) as err:
            kd_loss(s, t, **kwargs)
        assert err.value.key == key
    with pytest.raises(ValueError):
        kd_loss(s, _logits(2, 5))


# ------------------------------------------------------------------------------------------------
# schedule


def test_schedule_active_around_stop_step():
    sched = KDSchedule(KDConfig(stop_step=5, kd_weight=2.0), max_steps=10)
    assert sched.stop_step == 5
    assert [sched.active(s) for s in range(8)] == [True] * 5 + [False] * 3
    assert [sched.weight(s) for s in (0, 4, 5, 9)] == [2.0, 2.0, 0.0, 0.0]
    never = KDSchedule(KDConfig(stop_step=0), max_steps=10)
    assert not never.active(0) and never.weight(0) == 0.0
    always = KDSchedule(KDConfig(), max_steps=10)
    assert always.stop_step is None and always.active(10**9) and always.weight(10**9) == 1.0
    unlimited = KDSchedule(KDConfig(stop_step=100), max_steps=-1)  # Lightning's "no limit"
    assert unlimited.active(99) and not unlimited.active(100)


@pytest.mark.parametrize(
    ("fraction", "max_steps", "stop"),
    [(0.7, 572_000, 400_400), (0.7, 10, 7), (0.33, 10, 3), (0.37, 10, 4), (1.0, 300, 300), (0.001, 100, 0)],
)
def test_schedule_stop_fraction_rounds(fraction, max_steps, stop):
    assert KDSchedule(KDConfig(stop_fraction=fraction), max_steps).stop_step == stop


def test_schedule_linear_and_cosine_decay():
    lin = KDSchedule(KDConfig(stop_step=10, kd_weight=2.0, decay="linear"), max_steps=20)
    assert [lin.weight(s) for s in (0, 5, 9, 10, 15)] == pytest.approx([2.0, 1.0, 0.2, 0.0, 0.0])
    cos = KDSchedule(KDConfig(stop_fraction=0.5, kd_weight=2.0, decay="cosine"), max_steps=20)
    assert cos.stop_step == 10
    want = [2.0 * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)] + [0.0, 0.0]
    assert [cos.weight(s) for s in range(12)] == pytest.approx(want)
    assert cos.weight(5) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("overrides", "max_steps", "key"),
    [
        (dict(temperature=0.0), 10, "kd.temperature"),
        (dict(temperature=-1.0), 10, "kd.temperature"),
        (dict(beta=0.0), 10, "kd.beta"),
        (dict(beta=1.0), 10, "kd.beta"),
        (dict(stop_step=3, stop_fraction=0.5), 10, "kd.stop_fraction"),
        (dict(stop_fraction=0.0), 10, "kd.stop_fraction"),
        (dict(stop_fraction=1.5), 10, "kd.stop_fraction"),
        (dict(stop_fraction=-0.2), 10, "kd.stop_fraction"),
        (dict(stop_fraction=0.5), None, "kd.stop_fraction"),
        (dict(stop_step=-1), 10, "kd.stop_step"),
        (dict(stop_step=11), 10, "kd.stop_step"),
        (dict(loss="kl"), 10, "kd.loss"),
        (dict(decay="step"), 10, "kd.decay"),
        (dict(decay="linear"), 10, "kd.decay"),
        (dict(kd_weight=-1.0), 10, "kd.kd_weight"),
        (dict(ce_weight=-0.5), 10, "kd.ce_weight"),
        (dict(chunk_size=0), 10, "kd.chunk_size"),
        (dict(temperature="hot"), 10, "kd.temperature"),
        (dict(stop_step=2.5), 10, "kd.stop_step"),
        (dict(tempreature=2.0), 10, "kd.tempreature"),
    ],
)
def test_config_errors_name_the_key(overrides, max_steps, key):
    with pytest.raises(ConfigError) as err:
        KDSchedule(kd_config(OmegaConf.create(overrides)), max_steps)
    assert err.value.key == key
    assert key in str(err.value)


def test_schedule_uses_teacher_unless_kd_never_runs():
    assert not KDSchedule(KDConfig(stop_step=0), max_steps=10).uses_teacher
    assert not KDSchedule(KDConfig(stop_fraction=0.001), max_steps=100).uses_teacher  # rounds to step 0
    assert KDSchedule(KDConfig(stop_step=1), max_steps=10).uses_teacher
    assert KDSchedule(KDConfig(), max_steps=10).uses_teacher


def test_stop_step_beyond_max_steps_message():
    with pytest.raises(ConfigError, match="KD stop step beyond trainer.max_steps"):
        KDSchedule(KDConfig(stop_step=11), max_steps=10)
    assert KDSchedule(KDConfig(stop_step=10), max_steps=10).stop_step == 10  # KD all the way: allowed


def test_structured_config_roundtrip():
    node = OmegaConf.structured(KDConfig)
    node.stop_step = 7
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, KDConfig) and cfg.stop_step == 7 and cfg.stop_fraction is None
    assert kd_config(OmegaConf.create({})) == KDConfig()
    assert kd_config(node) == cfg


# ------------------------------------------------------------------------------------------------
# conf/kd


def kd_config(node) -> KDConfig:
    """What the app layer does with a `kd` node: merge onto the schema (an unknown key or a wrong type
    becomes a ConfigError naming it) and build the KDConfig (whose checks then run)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(KDConfig), node)
    except (ConfigKeyError, ValidationError) as err:
        raise ConfigError(f"kd.{err.full_key}", err.msg) from None
    return OmegaConf.to_object(merged)


def _load(name: str) -> KDConfig:
    node = OmegaConf.load(CONF_KD / f"{name}.yaml")
    assert "defaults" not in node
    return kd_config(node)


def test_conf_kd_files():
    staged = _load("staged")
    assert (staged.loss, staged.temperature, staged.kd_weight, staged.stop_fraction) == (
        "forward_kl",
        1.0,
        1.0,
        0.7,
    )
    sched = KDSchedule(staged, max_steps=572_000)
    assert sched.stop_step == 400_400 and sched.active(400_399) and not sched.active(400_400)
    none = KDSchedule(_load("none"), max_steps=300)
    assert not any(none.active(s) for s in range(301)) and none.weight(0) == 0.0
    assert not none.uses_teacher and sched.uses_teacher
    full = KDSchedule(_load("full"), max_steps=300)
    assert full.stop_step is None and all(full.weight(s) == 1.0 for s in range(301))
