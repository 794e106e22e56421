"""The transformers config of a distill model shipped with its own modeling code (`trust_remote_code`).

Self-contained (torch and transformers only): this file is copied verbatim into every exported directory,
next to `modeling_distill.py`. `distill` is the architecture as `distill.models.ModelConfig` writes it (a
plain dict, `moe` nested); the usual transformers fields are derived from it for the tools that read them.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# transformers field <- distill field (what generation, caches and lm-eval read)
DERIVED = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
           "num_attention_heads": "n_heads", "max_position_embeddings": "max_seq_len"}


class DistillMoEConfig(PretrainedConfig):
    model_type = "distill_moe"

    def __init__(self, distill: dict[str, Any] | None = None, **kwargs: Any):
        self.distill = dict(distill or {})
        d = self.distill
        for hf_key, key in DERIVED.items():
            kwargs.pop(hf_key, None)
            setattr(self, hf_key, d.get(key, 0))
        kwargs.pop("num_key_value_heads", None)
        self.num_key_value_heads = d.get("n_kv_heads") or d.get("n_heads", 0)
        kwargs["tie_word_embeddings"] = bool(d.get("tie_embeddings", True))
        super().__init__(**kwargs)
