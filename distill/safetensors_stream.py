"""A safetensors file written tensor by tensor: the header first, then each tensor's bytes as it comes.

The format: 8 bytes (little-endian u64) giving the header's length N, then N bytes of JSON
``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}`` padded with
spaces to a multiple of 8, then the tensors' bytes back to back (offsets relative to the data's start).
Since every tensor's size follows from its shape and dtype, the header can be written before any tensor
exists; only one tensor needs to be in memory at a time.

`save_order` gives the order `safetensors.torch.save_file` uses (dtype, then name), so that writing in that
order gives the same bytes as `save_file` (when there is at most one metadata key: safetensors writes
several in hash order).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.complex64: "C64",
}
# save_file's order: by dtype (this list, first first: safetensors sorts by its Dtype enum, descending), then name
_SAVE_RANK = ["U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
              "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]

Entry = tuple[str, Sequence[int], torch.dtype]  # (name, shape, dtype)


def dtype_code(dtype: torch.dtype) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"safetensors cannot store {dtype}")
    return DTYPES[dtype]


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= int(d)
    return n


def save_order(entries: Iterable[Entry]) -> list[Entry]:
    """`entries` in the order `save_file` writes them (its bytes then equal ours)."""
    return sorted(entries, key=lambda e: (_SAVE_RANK.index(dtype_code(e[2])), e[0]))


def header_bytes(entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the padded JSON header of a file holding `entries` in this order."""
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, shape, dtype in entries:
        if name in header:
            raise ValueError(f"tensor name {name!r} appears twice")
        size = nbytes(shape, dtype)
        header[name] = {"dtype": dtype_code(dtype), "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """Write a safetensors file whose tensors (name, shape, dtype) are known in advance, one at a time::

        with SafetensorsWriter(path, entries) as w:
            for name, shape, dtype in entries:
                w.write(name, produce(name))      # in the order of `entries`; only this tensor in memory

    A tensor that does not match its entry (name, shape, dtype), or a missing one at the end, is a
    ValueError; the file is then incomplete (write it to a temporary path and rename it when done).
    """

    def __init__(self, path: str | os.PathLike, entries: Sequence[Entry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = [(n, tuple(int(d) for d in s), dt) for n, s, dt in entries]
        head = header_bytes(self.entries, metadata)
        self._next = 0
        self._file = open(self.path, "wb")
        self._file.write(head)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.entries):
            raise ValueError(f"{self.path}: {name!r} is one tensor more than the header lists")
        want = self.entries[self._next]
        got = (name, tuple(tensor.shape), tensor.dtype)
        if got != want:
            raise ValueError(f"{self.path}: expected tensor #{self._next} {want}, got {got}")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.numel():
            data = t.reshape(-1).view(torch.uint8).numpy()  # no copy: the tensor's own bytes
            self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        if self._next != len(self.entries):
            raise ValueError(f"{self.path}: {len(self.entries) - self._next} tensors were never written "
                             f"(first: {self.entries[self._next][0]!r})")

    def abort(self) -> None:
        """Close the (incomplete) file without checking it."""
        self._file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def stream_save(path: str | os.PathLike, entries: Sequence[Entry], tensors: Iterable[torch.Tensor],
                metadata: dict[str, str] | None = None) -> Path:
    """Write the tensors (an iterable, e.g. a generator producing them one by one) under `entries`."""
    with SafetensorsWriter(path, entries, metadata) as w:
        for (name, _, _), t in zip(entries, tensors, strict=True):
            w.write(name, t)
    return Path(path)


# ------------------------------------------------------------------------------------ sharded models


def is_writer_rank() -> bool:
    """True unless torch.distributed is initialised and this is not rank 0."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def gather(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's `full_tensor()` (a collective every rank of its mesh enters), else `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


Convert = Callable[[torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def write_gathered(path: str | os.PathLike, entries: Sequence[Entry],
                   sources: Iterable[tuple[torch.Tensor, Convert]], metadata: dict[str, str] | None = None,
                   write: bool = True) -> None:
    """Gather each source tensor in turn (`gather`: every rank runs this with the same sources, in the
    same order) and, when `write`, write what `convert` makes of it: (name, tensor) pairs that follow
    `entries`. Only one gathered tensor (and what it converts to) is alive at a time.

    An error while writing is raised only after the last gather, so the other ranks are never left
    waiting in a collective this rank skipped.
    """
    writer, error = None, None
    if write:
        try:
            writer = SafetensorsWriter(path, entries, metadata)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the collectives
            error = e
    try:
        with torch.no_grad():
            for source, convert in sources:
                full = gather(source)
                if writer is not None and error is None:
                    try:
                        for name, tensor in convert(full):
                            writer.write(name, tensor)
                    except Exception as e:  # noqa: BLE001
                        error = e
                del full
    except BaseException:  # a source failed: every rank fails alike (or a collective did)
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        try:
            writer.close()
        except Exception as e:  # noqa: BLE001
            error = error or e
    if error is not None:
        raise error
