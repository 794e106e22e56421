"""The mid-epoch data position: a train loader that resumes at the exact next batch.

Lightning 2.6 restores the loop position but restarts a plain DataLoader at the first batch of the epoch
(it only warns). `ResumableLoader` records how many batches of which epoch were consumed and, after a
restore, skips them at the index level (no batch is loaded to be thrown away).

Why not torchdata's ``StatefulDataLoader`` (torchdata 0.11, measured under Lightning 2.6 with the
`DistributedSampler` of `LMDataModule`, 0 and 2 workers, resuming from the ModelCheckpoint of each step):
it resumes exactly inside epoch 0 only. From epoch 1 on (and at an epoch boundary) it replays the wrong
permutation, with the plain sampler and with torchdata's ``StatefulDistributedSampler`` alike: Lightning
creates the loader's iterator (which draws from the sampler at once) before it calls ``set_epoch``, and
the loader's state does not hold the epoch. Fixing that needs a wrapper that defers the first draw and
records the epoch, which is what `ResumableLoader` is; so it stays, and no dependency is added.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, Sampler

from distill.data.datamodule import LMDataModule


class _SkipFirst(Sampler):
    """A sampler that drops the first ``skip`` indices of its next pass (then resets ``skip`` to 0)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.skip = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        it = iter(self.inner)
        for _ in range(skip):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return len(self.inner)


class ResumableLoader:
    """A train DataLoader that resumes mid-epoch at the exact next batch (Lightning's `_Stateful`).

    ``state_dict`` records the sampler's epoch and the batches of it handed out so far; after
    ``load_state_dict`` the next pass over the same epoch skips those batches (their indices only).
    The pass starts on the first ``next()``: after Lightning has called the sampler's ``set_epoch``.
    """

    def __init__(self, loader: DataLoader):
        batches = loader.batch_sampler
        if not isinstance(batches, BatchSampler):
            raise TypeError("ResumableLoader needs a DataLoader built with batch_size (a BatchSampler)")
        self.loader = loader
        self._skipper = _SkipFirst(batches.sampler)
        batches.sampler = self._skipper
        self._epoch: int | None = None
        self._served = 0  # batches of the current pass handed out
        self._restored: dict[str, Any] | None = None

    # what Lightning looks at: length, dataset, samplers (set_epoch), worker_init_fn
    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    @property
    def worker_init_fn(self) -> Any:
        return self.loader.worker_init_fn

    @worker_init_fn.setter
    def worker_init_fn(self, fn: Any) -> None:
        self.loader.worker_init_fn = fn

    def __iter__(self) -> Iterator[Any]:
        epoch = getattr(self.loader.sampler, "epoch", None)
        skip, restored, self._restored = 0, self._restored, None
        if restored is not None and restored["epoch"] == epoch and 0 < restored["batches"] < len(self.loader):
            skip = restored["batches"]
        self._skipper.skip = skip * (self.loader.batch_size or 1)
        self._epoch, self._served = epoch, skip
        for batch in self.loader:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = dict(state)


class ResumableDataModule(LMDataModule):
    """`LMDataModule` whose train loader is a `ResumableLoader` (what the apps train with)."""

    def train_dataloader(self) -> ResumableLoader:  # type: ignore[override]
        return ResumableLoader(super().train_dataloader())
