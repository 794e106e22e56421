"""Reading a VL-MoE export back: the directory `distill.export.export_model` writes for any model
(model.safetensors, config.json, tokenizer.json), here with a `VLMoEConfig` in config.json's "model"."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_model

from distill.errors import ConfigError
from distill.export import CONFIG, WEIGHTS, is_export_dir
from distill.models.vl_config import VLMoEConfig
from distill.models.vlmoe import VLMoE


def read_vl_config(path: str | os.PathLike, key: str = "teacher.path") -> VLMoEConfig:
    """The checked config of a VL-MoE export directory; ConfigError naming ``key`` when it is not one."""
    p = Path(path).expanduser()
    if not is_export_dir(p):
        raise ConfigError(key, f"'{p}' is not an exported model directory (expected {WEIGHTS} and {CONFIG}).",
                          "point it at the teacher/export directory of an earlier `task=vl` pipeline run.")
    model = json.loads((p / CONFIG).read_text()).get("model", {})
    if "n_vl_layers" not in model:
        raise ConfigError(key, f"'{p}' holds a {model.get('name', 'text')} model, not a VL-MoE.",
                          "point it at the teacher/export directory of an earlier `task=vl` pipeline run.")
    return VLMoEConfig.from_dict(model).validate()


def load_vl_export(path: str | os.PathLike, key: str = "teacher.path") -> VLMoE:
    """The VL-MoE of an export directory, in eval mode."""
    cfg = read_vl_config(path, key)
    model = VLMoE(cfg)
    load_model(model, str(Path(path).expanduser() / WEIGHTS))
    return model.eval()
