"""Offline teacher targets: the teacher run once over a split of packed blocks, its top-k stored per token.

Row i of a targets dataset belongs to block i of the split (the packed blocks of `LMDataModule`), position t
to the prediction from the block's first t + 1 tokens (inputs = block[:-1], as in training). Columns:

    t_ids    [L, k]  the teacher's top-k token ids at temperature T (uint16 when the vocabulary fits, else int32)
    t_logp   [L, k]  their log-probabilities, float16 (or float32: `value_dtype`)
    t_tail   [L]     log of the remaining probability mass (float32: it spans many orders of magnitude)
    r_ids    [M, L, r]  each teacher MoE layer's r most probable experts (uint8 up to 256 experts, else int16)
    r_logp   [M, L, r]  their router log-probabilities (log softmax of the fp32 router logits), as t_logp; a layer
                        with fewer than r experts is padded with id 0 at -inf (both only for a teacher with MoE
                        layers; r = `router_topk` capped at the largest layer's expert count)

Stored as Arrow files written by `datasets` (`num_shards` shards of contiguous blocks, memory-mapped when read) under
``<cache>/teacher_targets/<key>/``, where the key digests the data fingerprint (corpus + tokenizer), the
teacher's sha256, k, T, the value dtype and r, so a second run, or another student, finds and reuses them. A directory is
complete only once `meta.json` is in it (written last, the directory renamed into place atomically); a
directory whose files do not match `meta.json` is refused with a ConfigError naming it.

The teacher runs on `batch_size` consecutive blocks at a time. A capacity-limited MoE teacher drops tokens
depending on what else is in its batch, so its stored outputs can differ slightly from those it gives online
on shuffled training batches; a dropless teacher gives the same either way.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Array2D, Array3D, Dataset, Features, Sequence, Value, concatenate_datasets

from distill.atomic import AtomicDir
from distill.data.config import digest
from distill.errors import ConfigError
from distill.kd.sparse import TopK, lm_sparse_kd_loss, teacher_topk

logger = logging.getLogger(__name__)

META = "meta.json"
FORMAT = 2  # 2: router log-probabilities (r_logp) instead of gate values


def targets_key(data_fingerprint: str, teacher_sha256: str, k: int, temperature: float, split: str) -> str:
    return f"{split}-k{k}-{digest(FORMAT, data_fingerprint, teacher_sha256, k, float(temperature), split)}"


def _id_dtype(n: int, small: str, big: str) -> str:
    return small if n <= np.iinfo(small).max + 1 else big


VALUE_DTYPES = ("float16", "float32")


def features(vocab_size: int, num_experts: int, seq_len: int, k: int, moe_layers: int, router_topk: int,
             value_dtype: str = "float16") -> Features:
    """Fixed-shape columns (Arrow tensors, read back as arrays without a Python round trip)."""
    tid, rid = _id_dtype(vocab_size, "uint16", "int32"), _id_dtype(num_experts, "uint8", "int16")
    cols = {"t_ids": Array2D((seq_len, k), tid), "t_logp": Array2D((seq_len, k), value_dtype),
            "t_tail": Sequence(Value("float32"), length=seq_len)}
    if moe_layers:
        cols |= {"r_ids": Array3D((moe_layers, seq_len, router_topk), rid),
                 "r_logp": Array3D((moe_layers, seq_len, router_topk), value_dtype)}
    return Features(cols)


def router_topk_of(num_experts: list[int], router_topk: int) -> int:
    """r: the router entries stored per token and MoE layer (`router_topk`, at most the largest layer's experts)."""
    return min(router_topk, max(num_experts or [1]))


def _top_routes(router_logits: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The r most probable experts [T, r] and their log-probabilities [T, r] (padded at -inf past E)."""
    logp = torch.log_softmax(router_logits.float(), dim=-1)
    top, ids = logp.topk(min(r, logp.shape[-1]), dim=-1)
    pad = r - top.shape[-1]
    if pad:
        top = torch.cat([top, top.new_full((top.shape[0], pad), float("-inf"))], -1)
        ids = torch.cat([ids, ids.new_zeros((ids.shape[0], pad))], -1)
    return ids, top


@torch.no_grad()
def teacher_rows(teacher: torch.nn.Module, blocks: Dataset, k: int, temperature: float, batch_size: int,
                 value_dtype: str = "float16", router_topk: int = 4) -> Iterator[dict[str, Any]]:
    """The targets of every block, in order (see the module docstring), one row at a time."""
    moe = teacher.cfg.num_moe_layers > 0
    r = router_topk_of(teacher.cfg.num_experts, router_topk)
    for start in range(0, len(blocks), batch_size):
        ids = torch.as_tensor(blocks[start:start + batch_size]["input_ids"])[:, :-1]
        out = teacher(ids, return_router_logits=True) if moe else teacher(ids)
        top = teacher_topk(out.logits.float(), k, temperature)
        B, L = ids.shape
        routes = [[t.view(B, L, r) for t in _top_routes(st.router_logits, r)] for st in out.moe_stats] if moe else []
        for b in range(B):
            row = {"t_ids": top.ids[b].numpy(), "t_logp": top.logp[b].to(getattr(torch, value_dtype)).numpy(),
                   "t_tail": top.tail[b].numpy()}
            if routes:
                row["r_ids"] = np.stack([e[b].numpy() for e, _ in routes])
                row["r_logp"] = np.stack([g[b].to(getattr(torch, value_dtype)).numpy() for _, g in routes])
            yield row


def build_targets(teacher: torch.nn.Module, blocks: Dataset, out_dir: Path, meta: dict[str, Any], *, k: int,
                  temperature: float, batch_size: int = 16, num_shards: int = 4, value_dtype: str = "float16",
                  router_topk: int = 4, progress: bool = True) -> Dataset:
    """Run the teacher over `blocks`, streaming the rows into `num_shards` Arrow files (contiguous ranges of
    blocks) in a temporary sibling of `out_dir`, renamed into place with `meta.json` last; return them."""
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    cfg = teacher.cfg
    if not 1 <= k <= cfg.vocab_size:
        raise ConfigError("kd.topk", f"must be in [1, {cfg.vocab_size}] (the teacher's vocabulary), got {k}.")
    n = len(blocks)
    shards = max(1, min(num_shards, n))
    bounds = shard_bounds(n, shards)
    seq_len = len(blocks[0]["input_ids"]) - 1 if n else 0
    r = router_topk_of(cfg.num_experts, router_topk)
    feats = features(cfg.vocab_size, max(cfg.num_experts or [1]), seq_len, k, cfg.num_moe_layers, r, value_dtype)
    start = time.perf_counter()
    teacher.eval()
    with AtomicDir(out_dir) as tmp:
        rows = teacher_rows(teacher, blocks, k, temperature, batch_size, value_dtype, router_topk)
        bar = tqdm(total=n, desc="teacher targets", unit="block", disable=not progress)
        for s in range(shards):
            with ArrowWriter(features=feats, path=str(tmp / shard_name(s, shards))) as writer:
                for _ in range(bounds[s], bounds[s + 1]):
                    writer.write(next(rows))
                    bar.update()
                writer.finalize()
        bar.close()
        seconds = time.perf_counter() - start
        tokens = n * seq_len
        full = {**meta, "format": FORMAT, "k": k, "temperature": float(temperature), "router_topk": router_topk,
                "rows": n, "shards": shards,
                "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
                "bytes_per_token": bytes_per_token(tmp, tokens)}
        (tmp / META).write_text(json.dumps(full, indent=2, sort_keys=True))
    logger.info("teacher targets: %d blocks (%d tokens) in %.1f s, %.0f tokens/s, %.1f bytes/token: %s",
                n, tokens, seconds, full["tokens_per_s"], full["bytes_per_token"], out_dir)
    return load_targets(out_dir, meta)


def shard_name(index: int, shards: int) -> str:
    return f"targets-{index:05d}-of-{shards:05d}.arrow"


def bytes_per_token(directory: Path, tokens: int) -> float:
    """Stored bytes (the Arrow files) per token."""
    size = sum(f.stat().st_size for f in Path(directory).glob("*.arrow"))
    return size / max(tokens, 1)


def read_meta(path: Path) -> dict[str, Any] | None:
    p = Path(path) / META
    return json.loads(p.read_text()) if p.is_file() else None


def shard_bounds(rows: int, shards: int) -> list[int]:
    """Shard s holds the rows [bounds[s], bounds[s + 1]) (contiguous ranges of blocks)."""
    return [rows * s // shards for s in range(shards + 1)]


def load_targets(path: Path, expect: dict[str, Any], shards: list[int] | None = None) -> Dataset:
    """The targets at `path` (only the shards `shards`, in that order, when given: a rank reads its own),
    checked against what the run expects (`expect`: data fingerprint, teacher sha256, k, temperature, split,
    rows); ConfigError naming the directory when they were made otherwise or their files are damaged."""
    meta = read_meta(path)
    if meta is None:
        raise ConfigError("kd.teacher_targets", f"{path} holds no complete teacher targets (no {META}).",
                          "delete the directory; the next run with kd.teacher_targets=offline recomputes them.")
    for key, want in expect.items():
        if meta.get(key) != want:
            raise ConfigError("kd.teacher_targets", f"the targets in {path} were made with {key}={meta.get(key)!r}, "
                              f"this run needs {want!r}.", "delete them or point the run at its own data and teacher.")
    own = list(range(meta["shards"])) if shards is None else list(shards)
    try:
        data = concatenate_datasets([Dataset.from_file(str(Path(path) / shard_name(i, meta["shards"])))
                                     for i in own])
    except Exception as err:  # a truncated or missing shard
        raise ConfigError("kd.teacher_targets", f"cannot read the targets in {path}: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}",
                          "delete the directory; the next run recomputes them.") from None
    bounds = shard_bounds(meta["rows"], meta["shards"])
    want = sum(bounds[i + 1] - bounds[i] for i in own)
    if len(data) != want:
        raise ConfigError("kd.teacher_targets", f"{path} holds {len(data)} rows in shards {own}, its {META} says "
                          f"{want}.", "delete the directory; the next run recomputes them.")
    return data


def targets_from_batch(batch: dict[str, torch.Tensor]) -> TopK:
    """The sparse teacher targets of a training batch that carries them (float32 log-probabilities)."""
    if "t_ids" not in batch:
        raise RuntimeError("kd.teacher_targets=offline, but the batch holds no teacher targets "
                           "(the data module was not given them: LMDataModule.attach_targets)")
    return TopK(batch["t_ids"].long(), batch["t_logp"].float(), batch["t_tail"].float())


def routes_from_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's stored routes of a training batch: expert ids [B, M, L, r] (long) and their router
    log-probabilities [B, M, L, r] (float32)."""
    if "r_ids" not in batch:
        raise RuntimeError("kd.router_weight > 0 with offline targets, but the batch holds no teacher routes "
                           "(a teacher without MoE layers, or targets attached without them)")
    return batch["r_ids"].long(), batch["r_logp"].float()


def lm_sparse_kd_from_config(student_logits: torch.Tensor, lm_targets: torch.Tensor, targets: TopK,
                             mask: torch.Tensor | None, cfg: Any) -> dict[str, torch.Tensor]:
    """{"ce", "kd"}: `lm_sparse_kd_loss` (the cross-entropy and the sparse KD loss in one pass) with loss,
    temperature, beta and chunk size from the `kd` node, on full logits. Training with the fused head passes the
    batch's `TopK` to `distill.kd.fused.fused_head_from_config` instead (the same per-chunk math, no logits)."""
    ce, kd = lm_sparse_kd_loss(student_logits, lm_targets, targets, mask, loss=cfg.loss,
                               temperature=cfg.temperature, beta=cfg.beta, chunk_size=cfg.chunk_size)
    return {"ce": ce, "kd": kd}


def ensure_targets(dm: Any, load_teacher: Any, teacher_sha256: str, *, k: int, temperature: float,
                   split: str = "train", batch_size: int = 16, num_shards: int = 4, value_dtype: str = "float16",
                   router_topk: int = 4, progress: bool = True) -> tuple[Dataset, Path, bool]:
    """The targets of `dm`'s `split` (a set-up `LMDataModule`) for this teacher, k and T: read from the cache
    when an earlier run made them (True), else computed with `load_teacher()` and stored (False)."""
    from distill.data.config import cache_root

    if value_dtype not in VALUE_DTYPES:
        raise ConfigError("targets.value_dtype", f"unknown dtype {value_dtype!r}.", f"use one of {VALUE_DTYPES}.")
    meta = {"data_fingerprint": dm.fingerprint, "teacher_sha256": teacher_sha256, "split": split,
            "vocab_size": dm.vocab_size, "value_dtype": value_dtype}
    key = targets_key(dm.fingerprint, teacher_sha256, k, temperature, f"{split}-{value_dtype}-r{router_topk}")
    path = cache_root(dm.cfg) / "teacher_targets" / key
    expect = {**meta, "k": k, "temperature": float(temperature), "router_topk": router_topk,
              "rows": len(dm.blocks[split])}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:  # the processes of a run: one computes, all reuse
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if read_meta(path) is not None:
                logger.info("teacher targets: reusing %s", path)
                return load_targets(path, expect), path, True
            data = build_targets(load_teacher(), dm.blocks[split], path, meta, k=k, temperature=temperature,
                                 batch_size=batch_size, num_shards=num_shards, value_dtype=value_dtype,
                                 router_topk=router_topk, progress=progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return data, path, False
