"""One rank of the sharded-teacher check (started by tests/test_sharded_load.py, one process per rank).

    python tests/sharded_load_worker.py OUT_DIR LAYOUT[;LAYOUT...] KIND=PATH[;KIND=PATH...]
    (RANK, WORLD_SIZE, MASTER_* in env)

KIND is ``native`` (an export directory), ``checkpoint`` (a .ckpt of it) or a Hugging Face family (``mixtral``, ``qwen2_moe``: a
`save_pretrained` directory). For every layout and teacher: the teacher loaded whole (`load`, for Hugging
Face the transformers model itself) is the reference; `TeacherLoader.sharded(mesh)` builds it on the meta
device and fills each rank's regions from the files. Compared: the logits of the same ids, every parameter's
`full_tensor()` with the file's tensor (for Hugging Face: the tensor the weight rules make of the files), the
buffers, and the elements each rank read from the safetensors files (a spy on `SafetensorsFiles.read`; a
checkpoint is memory-mapped, not counted).
Writes OUT_DIR/{LAYOUT}-{KIND}-rank{R}.json; the test asserts.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from distill.interop import gpt_from_hf
from distill.parallel.config import ParallelConfig
from distill.parallel.load import SafetensorsFiles
from distill.parallel.mesh import ParallelMesh
from distill.parallel.tensor import tp_sharded
from teachers.base import TeacherLoader
from teachers.hf import HFTeacher, safetensors_files
from teachers.native import CheckpointTeacher, ExportTeacher

READ = {"elements": 0}
_read = SafetensorsFiles.read


def counting_read(self: SafetensorsFiles, name: str, index: tuple[slice, ...]) -> torch.Tensor:
    value = _read(self, name, index)
    READ["elements"] += value.numel()
    return value


SafetensorsFiles.read = counting_read  # type: ignore[method-assign]


def parse_layout(text: str) -> ParallelConfig:
    return ParallelConfig(**{k: int(v) for k, v in (kv.split("=") for kv in text.split(","))})


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.full_tensor() if hasattr(a, "full_tensor") else a  # logits sharded on the vocabulary (tensor parallel)
    return (a.float() - b.float()).abs().max().item() if b.numel() else 0.0


def stored_total(path: Path) -> int:
    """Elements in the weights files of a teacher directory."""
    if path.suffix == ".ckpt":
        return 0
    files = safetensors_files(path)[0] or [path / "model.safetensors"]
    return sum(t.numel() for f in files for t in load_file(f).values())


def references(kind: str, path: Path, dtype: torch.dtype) -> tuple[object, torch.nn.Module, dict[str, torch.Tensor]]:
    """(source, the whole teacher in `dtype`, the tensors its parameters and buffers must equal, by our names)."""
    if kind == "native":
        source = ExportTeacher(path)
        stored = load_file(path / "model.safetensors")
        whole = source.load(dtype)
        tied = {"wte.weight": "lm_head.weight", "lm_head.weight": "wte.weight"}
        expect = {n: stored[n if n in stored else tied[n]] for n in whole.state_dict()}
        return source, whole, expect
    if kind == "checkpoint":
        source = CheckpointTeacher(path)
        whole = source.load(dtype)
        return source, whole, whole.state_dict()
    source = HFTeacher(path)
    whole = source.load(dtype)
    return source, whole, gpt_from_hf(whole.hf).state_dict()  # the files' tensors, converted whole


def check(mesh: ParallelMesh, kind: str, path: Path, ids: torch.Tensor, dtype: torch.dtype) -> dict:
    source, whole, expect = references(kind, path, dtype)
    with torch.no_grad():
        ref_logits = whole(ids).logits
    READ["elements"] = 0
    model = TeacherLoader(source, dtype).sharded(mesh)  # type: ignore[arg-type]
    read = READ["elements"]
    with torch.inference_mode():  # as DistillModule calls a teacher
        logits = model(ids).logits
    with torch.no_grad():
        again = model(ids).logits
    params = dict(model.named_parameters())  # sharded again after the forward (DTensors)
    param_diff = {n: diff(p.full_tensor(), expect[n].to(dtype)) for n, p in params.items()}
    shapes_ok = all(p.full_tensor().shape == expect[n].shape for n, p in params.items())
    buffers = dict(model.named_buffers())
    buffer_diff = {n: diff(b, expect[n].to(dtype)) for n, b in buffers.items() if n in expect}
    nonpersistent = {n: b.abs().max().item() for n, b in buffers.items() if n not in expect}
    return {
        "logits_diff": max(diff(logits, ref_logits), diff(again, ref_logits)), "param_diff": param_diff, "shapes_ok": shapes_ok,
        "buffer_diff": buffer_diff, "nonpersistent_max": nonpersistent, "read": read,
        "total": stored_total(path), "tied": model.lm_head.weight is model.wte.weight,
        "frozen": not model.training and not any(p.requires_grad for p in params.values()),
        "dtypes": sorted({str(p.dtype) for p in params.values()}),
        "local": sum(p.to_local().numel() for p in params.values()),
        "params": sum(p.numel() for p in params.values()),
        "tp_whole": sum(p.numel() for p in params.values() if not tp_sharded(p)),  # read by every rank of a tp group
    }


def main(out_dir: Path, layouts: list[str], teachers: list[str]) -> None:
    torch.set_num_threads(1)  # several ranks share few cores
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    for layout_text in layouts:
        layout = parse_layout(layout_text).resolve(world)
        mesh = ParallelMesh(layout)
        for spec in teachers:
            kind, _, path = spec.partition("=")
            dtype = torch.float32
            if kind.endswith("@bf16"):
                kind, dtype = kind.removesuffix("@bf16"), torch.bfloat16
            vocab = 256 if kind in ("native", "checkpoint") else 300
            seed = rank // layout.tp  # a tensor-parallel group shares its ids
            ids = torch.randint(vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
            result = {"rank": rank, "layout": layout_text, "kind": kind, "dtype": str(dtype),
                      **check(mesh, kind, Path(path), ids, dtype)}
            name = f"{layout_text.replace(',', '_').replace('=', '')}-{spec.partition('=')[0]}-rank{rank}"
            (out_dir / f"{name}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(";"), sys.argv[3].split(";"))
