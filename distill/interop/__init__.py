"""Conversion between our models and other libraries' (Hugging Face transformers), shared by teachers/ and
students/: configs (`hf_config`; DeepSeek's in `hf_deepseek`), weights and whole models (`hf_weights`),
`save_pretrained` export (`hf_export`). The families are `FAMILIES`: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
GPT-OSS, DeepSeek-V2 and DeepSeek-V3."""

from distill.interop.hf_config import FAMILIES, hf_config_from_model, hf_family, model_config_from_hf
from distill.interop.hf_export import export_hf, export_hf_from_native
from distill.interop.hf_weights import (
    Rule,
    gpt_from_hf,
    hf_from_gpt,
    state_from_hf,
    state_to_hf,
    teacher_gpt_for_student,
    weight_rules,
)

__all__ = [
    "FAMILIES",
    "Rule",
    "export_hf",
    "export_hf_from_native",
    "gpt_from_hf",
    "hf_config_from_model",
    "hf_family",
    "hf_from_gpt",
    "model_config_from_hf",
    "state_from_hf",
    "state_to_hf",
    "teacher_gpt_for_student",
    "weight_rules",
]
