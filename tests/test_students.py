"""Mixture-of-Students derivation: depth, the kept MoE layers, and initialisation from the teacher."""

from __future__ import annotations

import pytest
import torch

from distill.errors import ConfigError
from distill.models import GPT, ModelConfig
from students.config import StudentConfig
from students.mos import default_teacher_layers, derive_student, init_student_from_teacher


def tiny_teacher_cfg(n_layers: int = 6, experts: list[int] | None = None):
    return ModelConfig.from_dict(
        dict(name="t", vocab_size=97, d_model=32, n_layers=n_layers, n_heads=2, max_seq_len=16,
             num_experts=experts or [4, 4, 8], moe=dict(top_k=1, residual=True, dropless=True))
    ).validate()


def test_paper_mos_keeps_deepest_moe_layers():
    teacher = ModelConfig.from_dict(
        dict(name="350m_prmoe", vocab_size=50257, d_model=64, n_layers=24, n_heads=4, max_seq_len=32,
             num_experts=[32] * 10 + [64] * 2)
    ).validate()
    student = derive_student(teacher, StudentConfig(depth_ratio=0.875))
    assert student.n_layers == 21
    assert student.num_experts == [32] * 8 + [64] * 2  # DeepSpeed-MoE's MoS: 32x8 + 64x2
    assert student.vocab_size == teacher.vocab_size and student.d_model == teacher.d_model


@pytest.mark.parametrize(
    "student, key",
    [
        (StudentConfig(n_layers=7), "student.n_layers"),
        (StudentConfig(n_layers=0), "student.n_layers"),
        (StudentConfig(depth_ratio=1.5), "student.depth_ratio"),
        (StudentConfig(n_layers=4, num_experts=[4, 4, 4]), "student.num_experts"),
    ],
)
def test_bad_student_configs_name_the_key(student, key):
    with pytest.raises(ConfigError) as err:
        derive_student(tiny_teacher_cfg(), student)
    assert err.value.key == key


def test_default_mapping_keeps_kind_and_depth():
    t = tiny_teacher_cfg(6)  # blocks: D M D M D M
    s = derive_student(t, StudentConfig(n_layers=4))  # D M D M
    mapping = default_teacher_layers(t, s)
    assert mapping == [2, 3, 4, 5]
    assert [t.is_moe_block(ti) for ti in mapping] == [s.is_moe_block(i) for i in range(s.n_layers)]
    assert s.num_experts == [4, 8]


def test_student_from_all_teacher_layers_reproduces_teacher_logits():
    torch.manual_seed(0)
    t_cfg = tiny_teacher_cfg(6)
    teacher = GPT(t_cfg).eval()
    s_cfg = derive_student(t_cfg, StudentConfig(n_layers=6))
    student = GPT(s_cfg).eval()
    idx = torch.randint(0, 97, (2, 12))
    assert not torch.allclose(student(idx).logits, teacher(idx).logits)
    init_student_from_teacher(student, teacher, StudentConfig(init="teacher"))
    torch.testing.assert_close(student(idx).logits, teacher(idx).logits)


def test_init_from_teacher_rejects_kind_mismatch():
    t_cfg = tiny_teacher_cfg(6)
    s_cfg = derive_student(t_cfg, StudentConfig(n_layers=4))
    with pytest.raises(ConfigError) as err:
        init_student_from_teacher(GPT(s_cfg), GPT(t_cfg), StudentConfig(teacher_layers=[1, 2, 3, 4]))
    assert err.value.key == "student.teacher_layers"


def _planted_teacher() -> GPT:
    """A teacher whose experts 1 and 3 of every MoE block have outputs 10x larger: the important ones."""
    torch.manual_seed(0)
    teacher = GPT(tiny_teacher_cfg(6, experts=[4, 4, 4])).eval()
    with torch.no_grad():
        for block in teacher.blocks:
            if block.is_moe:
                block.ffn.experts.w_out[[1, 3]] *= 10
    return teacher


@pytest.mark.parametrize("selection, kept", [("first", [0, 1]), ("importance", [1, 3]), ("merge", [1, 3])])
def test_init_from_teacher_with_fewer_experts_keeps_the_selected_ones(selection: str, kept: list[int]):
    teacher = _planted_teacher()
    s = StudentConfig(n_layers=4, num_experts=[2, 2], init="teacher", expert_selection=selection)
    student = GPT(derive_student(teacher.cfg, s)).eval()
    calibration = [torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    mapping = init_student_from_teacher(student, teacher, s, calibration)
    for si, ti in enumerate(mapping):
        t_block, s_block = teacher.blocks[ti], student.blocks[si]
        torch.testing.assert_close(s_block.attn.c_attn.weight, t_block.attn.c_attn.weight)
        if s_block.is_moe:
            torch.testing.assert_close(s_block.ffn.router.weight, t_block.ffn.router.weight[kept])
            if selection != "merge":  # merge averages the dropped experts into the kept ones
                torch.testing.assert_close(s_block.ffn.experts.w_in, t_block.ffn.experts.w_in[kept])
        else:
            torch.testing.assert_close(s_block.state_dict(), t_block.state_dict())
    torch.testing.assert_close(student.state_dict()["wte.weight"], teacher.state_dict()["wte.weight"])
    assert torch.isfinite(student(calibration[0]).logits).all()


def test_importance_selection_needs_calibration_and_fewer_experts():
    teacher = _planted_teacher()
    s = StudentConfig(n_layers=4, num_experts=[2, 2], init="teacher", expert_selection="importance")
    with pytest.raises(ValueError, match="calibration"):
        init_student_from_teacher(GPT(derive_student(teacher.cfg, s)), teacher, s)
    with pytest.raises(ConfigError) as err:
        StudentConfig(expert_selection="best").validate()
    assert err.value.key == "student.expert_selection"
