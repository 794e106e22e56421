"""One rank of the sharded-export check (started by tests/test_export_stream.py, one process per rank).

    python tests/export_stream_worker.py OUT_DIR LAYOUT[;LAYOUT...]   (RANK, WORLD_SIZE, MASTER_* in env)

Every rank builds the same Qwen2-MoE-shaped GPT (tied head, q/k/v biases, a dense block, a shared
expert; 4 experts). Rank 0 exports it unsharded to OUT_DIR/ref (native and Hugging Face). Then, per
LAYOUT (e.g. ``ep=2``, ``dp_shard=2``), a copy is laid out by `parallelize`, runs one forward (the root
stays unsharded after it), and every rank calls `export_model` and `export_hf` on it; rank 0 writes
OUT_DIR/{layout}/native and OUT_DIR/{layout}/hf. The test compares the files.
"""

from __future__ import annotations

import copy
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from distill.export import export_model
from distill.interop import export_hf
from distill.models import GPT, ModelConfig
from distill.parallel.config import ParallelConfig
from distill.parallel.mesh import ParallelMesh
from distill.parallel.parallelize import parallelize


def model_config() -> ModelConfig:
    from transformers import Qwen2MoeConfig

    from distill.interop import model_config_from_hf

    hf = Qwen2MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
                        shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2,
                        norm_topk_prob=False, qkv_bias=True, tie_word_embeddings=True,
                        max_position_embeddings=64)
    return model_config_from_hf(hf, name="stream")


def reference_model(cfg: ModelConfig) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # norm gains away from 1, so that a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                p.uniform_(0.5, 1.5)
    return model.eval()


def parse_layout(text: str) -> ParallelConfig:
    return ParallelConfig(**{k: int(v) for k, v in (kv.split("=") for kv in text.split(","))})


def main(out_dir: Path, layouts: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = model_config()
    ref = reference_model(cfg)
    if rank == 0:  # unsharded: no collectives, the writer alone
        export_model(ref, cfg, out_dir / "ref" / "native", meta={"k": 1})
        export_hf(ref, out_dir / "ref" / "hf")
    ids = torch.randint(cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    for text in layouts:
        model = copy.deepcopy(ref)
        parallelize(model, ParallelMesh(parse_layout(text).resolve(world)))
        with torch.no_grad():
            model(ids)
        state = model.state_dict(keep_vars=True)
        sharded = sorted(n for n, t in state.items() if isinstance(t, DTensor) and t.to_local().numel() < t.numel())
        out = out_dir / text.replace(",", "_").replace("=", "")
        export_model(model, cfg, out / "native", meta={"k": 1})
        export_hf(model, out / "hf")
        info = {"rank": rank, "sharded": sharded, "tied": state["wte.weight"] is state["lm_head.weight"]}
        (out_dir / f"{out.name}-rank{rank}.json").write_text(json.dumps(info))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(";"))
