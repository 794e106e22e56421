"""Our models as transformers `save_pretrained` directories (load with AutoModelForCausalLM)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.interop.hf_weights import hf_from_gpt
from distill.models import GPT


def export_hf(model: GPT, out_dir: str | Path, base: Any = None, tokenizer: str | Path | Any = None) -> Path:
    """Write `model` as a transformers `save_pretrained` directory (loads with AutoModelForCausalLM).

    `base`: a transformers config whose non-architecture fields (token ids) to keep. `tokenizer`: a
    Hugging Face tokenizer directory, a tokenizer.json, or a `tokenizers.Tokenizer`; saved alongside.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = Path(out_dir)
    hf_from_gpt(model, base).save_pretrained(out)
    if tokenizer is None:
        return out
    path = Path(tokenizer) if isinstance(tokenizer, (str, Path)) else None
    if path is not None and path.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    elif path is not None:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    tok.save_pretrained(out)
    return out


def export_hf_from_native(export_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert an export directory of this project (e.g. a distilled student) to a `save_pretrained` one.
    When it was distilled from a Hugging Face teacher that still exists, the teacher's config (token ids)
    and tokenizer files are reused; otherwise the export's tokenizer.json is wrapped."""
    from transformers import AutoConfig

    from distill.export import CONFIG, TOKENIZER, load_exported

    src = Path(export_dir).expanduser()
    model, _ = load_exported(src, key="export_dir")
    teacher = (json.loads((src / CONFIG).read_text()).get("meta") or {}).get("teacher") or {}
    teacher_dir = Path(teacher["path"]) if teacher.get("path") else None
    base, tokenizer = None, src / TOKENIZER if (src / TOKENIZER).is_file() else None
    if teacher_dir is not None and (teacher_dir / "config.json").is_file():
        base = AutoConfig.from_pretrained(str(teacher_dir), local_files_only=True)
        if (teacher_dir / "tokenizer_config.json").is_file():
            tokenizer = teacher_dir
    return export_hf(model, out_dir, base=base, tokenizer=tokenizer)
