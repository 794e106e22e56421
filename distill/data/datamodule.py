"""The LightningDataModule: corpus -> tokenizer -> tokens -> packed blocks, and the loaders over them."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from datasets import Dataset, DatasetDict, concatenate_datasets
from torch.utils.data import DataLoader, DistributedSampler

from distill.data.config import SPLITS, DataConfig, cache_root, digest
from distill.data.corpus import build_corpus, corpus_fingerprint
from distill.data.packing import pack_corpus, tokenize_corpus, total_length
from distill.data.tokenizer import TextTokenizer, build_tokenizer

logger = logging.getLogger(__name__)


class LMDataModule(L.LightningDataModule):
    """Packed language-modelling blocks; batches are {"input_ids": LongTensor[B, seq_len + 1]}.

    `prepare_data()` builds and caches everything (once per node); `setup()` runs the same build, which
    then only loads from the cache. The train loader shuffles with `data.seed` through a
    DistributedSampler over the strategy's data-parallel replicas (one replica without a trainer), so
    the order is the same on every run and replicas never share a block; Lightning leaves it in place
    and calls its `set_epoch`. With offline teacher targets, each replica reads only its own shards of
    them (and the blocks they belong to). Validation and test loaders keep their order (Lightning shards them).
    `cfg` is used as given (the app layer runs `DataConfig.validate` once per run).
    """

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer: TextTokenizer | None = None
        self.vocab_size: int | None = None
        self.fingerprint: str | None = None
        self.corpus: DatasetDict | None = None
        self.tokens: DatasetDict | None = None
        self.blocks: DatasetDict | None = None
        self._stats: dict[str, Any] | None = None
        self.train_targets: Dataset | None = None  # offline teacher targets, one row per train block
        self.targets_path: Path | None = None  # their directory (its shards: what each replica reads)

    def _build(self) -> tuple[DatasetDict, TextTokenizer, DatasetDict, DatasetDict]:
        start = time.perf_counter()
        corpus = build_corpus(self.cfg)
        tokenizer = build_tokenizer(self.cfg, corpus)
        tokens = tokenize_corpus(corpus, tokenizer)
        blocks = pack_corpus(tokens, self.cfg.seq_len, cache_root(self.cfg) / "datasets")
        logger.info(
            "data: %s blocks of %d tokens, ready in %.1f s",
            "/".join(str(len(blocks[s])) for s in SPLITS),
            self.cfg.seq_len + 1,
            time.perf_counter() - start,
        )
        return corpus, tokenizer, tokens, blocks

    def prepare_data(self) -> None:
        self._build()

    def setup(self, stage: str | None = None) -> None:
        if self.blocks is not None:
            return
        self.corpus, self.tokenizer, self.tokens, self.blocks = self._build()
        self.vocab_size = self.tokenizer.vocab_size
        self.fingerprint = digest(corpus_fingerprint(self.corpus), self.tokenizer.fingerprint)

    def _split(self, split: str) -> Dataset:
        if self.blocks is None:
            raise RuntimeError("LMDataModule: call setup() first")
        if split == "train" and self.train_targets is not None:  # each batch carries its blocks' targets
            return concatenate_datasets([self.blocks[split], self.train_targets], axis=1).with_format("torch")
        return self.blocks[split].with_format("torch")

    def attach_targets(self, targets: Dataset, path: str | os.PathLike | None = None) -> None:
        """Offline teacher targets (distill/kd/targets.py): row i belongs to train block i; the train batches
        then also hold their t_ids / t_logp / t_tail / r_ids / r_logp. With their directory (`path`), each of
        several data-parallel replicas reads only its own shards (`own_shards`)."""
        if self.blocks is None or len(targets) != len(self.blocks["train"]):
            raise ValueError("the targets must have one row per train block of this data module")
        self.train_targets = targets
        self.targets_path = Path(path) if path is not None else None

    def own_shards(self, num_replicas: int, rank: int) -> Dataset | None:
        """The train blocks of this replica with their targets, read from its own shards only: shard s belongs
        to replica s % num_replicas, every replica keeps as many rows as the smallest share (so all step
        alike). None when there are fewer shards than replicas (each then maps every shard)."""
        from distill.kd.targets import load_targets, read_meta, shard_bounds

        meta = read_meta(self.targets_path) or {}
        shards = meta.get("shards", 0)
        if shards < num_replicas:
            logger.warning("teacher targets: %d shards for %d replicas; every replica maps all of them",
                           shards, num_replicas)
            return None
        bounds = shard_bounds(meta["rows"], shards)
        share = [sum(bounds[s + 1] - bounds[s] for s in range(r, shards, num_replicas)) for r in range(num_replicas)]
        mine, n = list(range(rank, shards, num_replicas)), min(share)
        rows = [i for s in mine for i in range(bounds[s], bounds[s + 1])][:n]
        targets = load_targets(self.targets_path, {}, shards=mine).select(range(n))
        logger.info("teacher targets: replica %d of %d reads shards %s (%d blocks)", rank, num_replicas, mine, n)
        return concatenate_datasets([self.blocks["train"].select(rows), targets], axis=1).with_format("torch")

    def _replicas(self) -> dict[str, int]:
        """num_replicas and rank of this process among the data-parallel replicas."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        return kwargs or {"num_replicas": 1, "rank": 0}

    def train_dataloader(self) -> DataLoader:
        replicas = self._replicas()
        if self.targets_path is not None and replicas["num_replicas"] > 1:
            own = self.own_shards(replicas["num_replicas"], replicas["rank"])
            if own is not None:  # this replica's blocks only, shuffled among themselves
                sampler = DistributedSampler(own, num_replicas=1, rank=0, shuffle=True, seed=self.cfg.seed,
                                             drop_last=True)
                return self._loader(own, self.cfg.batch_size, sampler=sampler)
        data = self._split("train")
        sampler = DistributedSampler(data, shuffle=True, seed=self.cfg.seed, drop_last=True, **replicas)
        return self._loader(data, self.cfg.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split("validation"), self.cfg.eval_batch_size or self.cfg.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._split("test"), self.cfg.eval_batch_size or self.cfg.batch_size)

    def _loader(
        self, data: Dataset, batch_size: int, sampler: DistributedSampler | None = None
    ) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def stats(self) -> dict[str, Any]:
        """Documents, UTF-8 bytes, tokens (with end-of-text) and blocks per split; vocab; bytes per token."""
        if self._stats is None:
            if self.blocks is None:
                raise RuntimeError("LMDataModule: call setup() first")
            splits = {
                split: {
                    "documents": len(self.corpus[split]),
                    "bytes": total_length(self.corpus[split], "text"),
                    "tokens": total_length(self.tokens[split], "input_ids"),
                    "blocks": len(self.blocks[split]),
                }
                for split in SPLITS
            }
            train = splits["train"]
            self._stats = {
                "splits": splits,
                "vocab_size": self.vocab_size,
                "tokenizer": self.tokenizer.kind,
                "seq_len": self.cfg.seq_len,
                # text tokens only: every document adds one end-of-text token
                "bytes_per_token": train["bytes"] / max(train["tokens"] - train["documents"], 1),
                "fingerprint": self.fingerprint,
            }
        return self._stats


def format_stats(stats: dict[str, Any]) -> str:
    """A small table of `LMDataModule.stats()`."""
    cols = ("documents", "bytes", "tokens", "blocks")
    lines = [f"{'split':<12}" + "".join(f"{c:>14}" for c in cols)]
    for split, row in stats["splits"].items():
        lines.append(f"{split:<12}" + "".join(f"{row[c]:>14,}" for c in cols))
    lines.append(
        f"tokenizer {stats['tokenizer']}, vocab {stats['vocab_size']:,}, {stats['bytes_per_token']:.2f} bytes/token, "
        f"blocks of seq_len + 1 = {stats['seq_len'] + 1} tokens, fingerprint {stats['fingerprint']}"
    )
    return "\n".join(lines)
