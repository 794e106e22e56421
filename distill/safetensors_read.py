"""Reading safetensors files region by region (the sharded teacher: distill/parallel/load.py).

Regions are read with ``pread`` straight into their tensor, not through a memory map: the pages of a file
a rank maps stay in its resident memory until the map is closed, so a rank reading a quarter of a teacher
through a map can end up holding most of the file. The format: an 8-byte little-endian header length, a
JSON header (name -> dtype, shape, data_offsets), then the data (distill/safetensors_stream.py writes it).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from distill.errors import ConfigError
from distill.safetensors_stream import DTYPES

Index = tuple[slice, ...]


_DTYPES = {code: dtype for dtype, code in DTYPES.items()}


def _header(file: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data, the header's tensor entries) of a safetensors file; ValueError if broken."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"its header claims {n} bytes, the file has {size - 8} after the length")
        entries = json.loads(f.read(n))
    entries.pop("__metadata__", None)
    end = max((e["data_offsets"][1] for e in entries.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return 8 + n, entries


class SafetensorsFiles:
    """Named tensors of one or more safetensors files, read region by region with ``pread`` straight into
    the region's tensor: no memory map, so a rank's resident memory grows by what it reads, nothing more.

    Opening checks every file's header (a truncated file's header says its data is longer than the file):
    a missing, unreadable or truncated file is a ConfigError naming it and `key`. A name in two files is an
    error too. ``elements_read`` counts the elements read so far.
    """

    def __init__(self, files: Iterable[str | Path], key: str = "teacher.path",
                 fix: str = "re-export or re-download the teacher; the file is missing, damaged or incomplete."):
        self.key, self.fix = key, fix
        self.entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}  # name -> (file, data start, entry)
        self.elements_read = 0
        for file in map(Path, files):
            if not file.is_file():
                raise ConfigError(key, f"the weights file {file} is missing.", fix)
            try:
                start, entries = _header(file)
            except Exception as err:  # unreadable JSON, a short file, a truncated one
                raise ConfigError(key, f"{file} is not a readable safetensors file "
                                  f"({str(err).splitlines()[0]}).", fix) from None
            for name, entry in entries.items():
                if name in self.entries:
                    raise ConfigError(key, f"tensor `{name}` is in both {self.entries[name][0]} and {file}.", fix)
                if entry["dtype"] not in _DTYPES:
                    raise ConfigError(key, f"tensor `{name}` of {file} has the unsupported dtype {entry['dtype']}.",
                                      fix)
                self.entries[name] = (file, start, entry)

    @property
    def where(self) -> dict[str, Path]:
        return {name: e[0] for name, e in self.entries.items()}

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][2]["shape"])

    def read(self, name: str, index: Index) -> torch.Tensor:
        """The region ``index`` (slices, step 1) of tensor ``name``: one ``pread`` per contiguous run."""
        if name not in self.entries:
            raise ConfigError(self.key, f"the weights files lack the tensor `{name}`.", self.fix)
        file, start, entry = self.entries[name]
        shape, dtype = tuple(entry["shape"]), _DTYPES[entry["dtype"]]
        bounds = [(sl.indices(n)[0], sl.indices(n)[1]) if i < len(index) else (0, n)
                  for i, (n, sl) in enumerate(zip(shape, (*index, *[slice(None)] * len(shape))))]
        region = tuple(max(0, b - a) for a, b in bounds)
        out = torch.empty(region, dtype=dtype)
        self.elements_read += out.numel()
        if out.numel() == 0:
            return out
        # dims after `k` are whole: each run is region[k] x prod(shape[k+1:]) elements, one per outer index
        k = len(shape) - 1
        while k > 0 and region[k] == shape[k]:
            k -= 1
        inner = math.prod(shape[k + 1:])
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        item = out.element_size()
        flat = out.view(torch.uint8).reshape(-1) if out.dim() else out.view(torch.uint8)
        run = region[k] * inner * item
        offset0 = start + entry["data_offsets"][0]
        with open(file, "rb", buffering=0) as f:
            fd = f.fileno()
            for j, outer in enumerate(itertools.product(*(range(a, b) for a, b in bounds[:k]))):
                elem = sum(i * st for i, st in zip(outer, strides)) + bounds[k][0] * strides[k]
                view = memoryview(flat[j * run : (j + 1) * run].numpy())
                if os.preadv(fd, [view], offset0 + elem * item) != run:
                    raise ConfigError(self.key, f"{file} ended while reading `{name}` (truncated).", self.fix)
        return out

    def tensor(self, name: str) -> Any:
        """A lazy tensor (`distill.parallel.load.Stored`) reading ``name`` region by region."""
        from distill.parallel.load import Stored

        return Stored(self, name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.shape(name) for name in self.entries}
