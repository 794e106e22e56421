"""Sharded loading (docs/architecture.md, "Parallel layouts"): a model built on the meta device, laid out by
`parallelize` and materialised with ``to_empty``, is filled region by region, so that each rank reads
only its slices of the weights files.

- `load_sharded_(model, read)` fills every parameter's local region with ``read(name, index)`` (``index``:
  a tuple of slices in global coordinates), reads persistent buffers whole and zeroes the others.
- `SafetensorsFiles` opens one or more safetensors files (headers checked first: a missing or truncated
  file is a ConfigError, raised before any collective) and reads slices with ``get_slice(name)[index]``.
- Lazy tensors (`Stored`, `Loaded`, `Cat`, `Stack`, `Transposed`, `Narrow`, `Interleaved`) describe a
  tensor made of stored ones (per-expert files stacked, transposed experts, fused q/k/v and SwiGLU
  projections interleaved as `distill.models.fused` lays them out); ``read(index)`` reads only what the
  region needs. `lazy_reader` turns a name -> lazy tensor map into a ``read`` function.
- `build_sharded(cfg, mesh, read, dtype)`: the GPT on the meta device, parallelized, materialised, loaded,
  frozen (eval mode, no gradients), resharding after every forward, callable under inference mode: a
  sharded teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from distill.errors import ConfigError
from distill.safetensors_read import SafetensorsFiles

Index = tuple[slice, ...]
Reader = Callable[[str, Index], torch.Tensor]


def full_index(shape: Iterable[int]) -> Index:
    return tuple(slice(0, n) for n in shape)


def local_region(p: torch.Tensor) -> tuple[torch.Tensor, Index]:
    """(the tensor holding this rank's region of `p`, that region in global coordinates). A DTensor's region
    follows its placements (also 2-D ones, e.g. experts over (FSDP, ep)); a plain tensor is whole."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(p, DTensor):
        return p, full_index(p.shape)
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    local = p.to_local()
    if tuple(local.shape) != tuple(shape):
        raise RuntimeError(f"local shard of shape {tuple(local.shape)}, but its placements imply {tuple(shape)}")
    return local, tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _fill(target: torch.Tensor, name: str, index: Index, read: Reader) -> None:
    if target.numel() == 0:
        return
    value = read(name, index)
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"`{name}`{_show(index)}: read a tensor of shape {tuple(value.shape)}, expected "
                         f"{tuple(target.shape)}")
    target.copy_(value)


@torch.no_grad()
def load_sharded_(model: nn.Module, read: Reader) -> None:
    """Fill `model` (parallelized and ``to_empty``'d, or a plain module) in place: each parameter's local
    region from ``read(name, index)``, each persistent buffer whole, each non-persistent buffer zeroed.
    A parameter shared under several names (tied embeddings) is read once, under its first name."""
    for name, p in model.named_parameters():
        local, index = local_region(p)
        _fill(local, name, index, read)
    for prefix, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is None:
                continue
            if name in module._non_persistent_buffers_set:
                buf.zero_()
            else:
                _fill(buf, f"{prefix}.{name}" if prefix else name, full_index(buf.shape), read)


def _show(index: Index) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in index) + "]"


# ---------------------------------------------------------------------------------------------- files


# ---------------------------------------------------------------------------------------------- lazy tensors


class LazyTensor:
    """A tensor that is read when asked, region by region."""

    shape: tuple[int, ...]

    def read(self, index: Index) -> torch.Tensor:
        raise NotImplementedError


class Stored(LazyTensor):
    """A tensor of a `SafetensorsFiles`."""

    def __init__(self, files: SafetensorsFiles, name: str):
        self.files, self.name, self.shape = files, name, files.shape(name)

    def read(self, index: Index) -> torch.Tensor:
        return self.files.read(self.name, index)


class Loaded(LazyTensor):
    """A tensor already at hand (in memory, or memory-mapped: indexing touches only the region's pages)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.shape = tensor, tuple(tensor.shape)

    def read(self, index: Index) -> torch.Tensor:
        return self.tensor[index]


class Cat(LazyTensor):
    """`parts` concatenated along `dim`: a region reads only the parts (and rows of them) it covers."""

    def __init__(self, parts: list[LazyTensor], dim: int = 0):
        rest = {p.shape[:dim] + p.shape[dim + 1 :] for p in parts}
        if len(rest) != 1:
            raise ValueError(f"cannot concatenate shapes {[p.shape for p in parts]} along dim {dim}")
        self.parts, self.dim = parts, dim
        first = parts[0].shape
        self.shape = first[:dim] + (sum(p.shape[dim] for p in parts),) + first[dim + 1 :]

    def read(self, index: Index) -> torch.Tensor:
        d, want = self.dim, index[self.dim]
        pieces, start = [], 0
        for part in self.parts:
            stop = start + part.shape[d]
            lo, hi = max(want.start, start), min(want.stop, stop)
            if lo < hi:
                pieces.append(part.read(index[:d] + (slice(lo - start, hi - start),) + index[d + 1 :]))
            start = stop
        if not pieces:  # an empty region
            return self.parts[0].read(index[:d] + (slice(0, 0),) + index[d + 1 :])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, d)


class Stack(LazyTensor):
    """`parts` (one shape) stacked along a new dim 0 (per-expert tensors -> [E, ...])."""

    def __init__(self, parts: list[LazyTensor]):
        if len({p.shape for p in parts}) != 1:
            raise ValueError(f"cannot stack shapes {[p.shape for p in parts]}")
        self.parts, self.shape = parts, (len(parts), *parts[0].shape)

    def read(self, index: Index) -> torch.Tensor:
        rows = range(index[0].start, index[0].stop)
        if not rows:  # an empty region
            return self.parts[0].read(index[1:])[None][:0]
        return torch.stack([self.parts[i].read(index[1:]) for i in rows])


class Transposed(LazyTensor):
    """`inner` with dims `a` and `b` swapped."""

    def __init__(self, inner: LazyTensor, a: int, b: int):
        self.inner, self.a, self.b = inner, a, b
        shape = list(inner.shape)
        shape[a], shape[b] = shape[b], shape[a]
        self.shape = tuple(shape)

    def read(self, index: Index) -> torch.Tensor:
        swapped = list(index)
        swapped[self.a], swapped[self.b] = swapped[self.b], swapped[self.a]
        return self.inner.read(tuple(swapped)).transpose(self.a, self.b)


class Narrow(LazyTensor):
    """`inner[start:start + length]` along `dim`."""

    def __init__(self, inner: LazyTensor, dim: int, start: int, length: int):
        self.inner, self.dim, self.start = inner, dim, start
        shape = list(inner.shape)
        shape[dim] = length
        self.shape = tuple(shape)

    def read(self, index: Index) -> torch.Tensor:
        want = index[self.dim]
        moved = slice(want.start + self.start, want.stop + self.start)
        return self.inner.read(index[: self.dim] + (moved,) + index[self.dim + 1 :])


class Interleaved(LazyTensor):
    """`distill.models.fused.interleave(parts, sizes, dim)`, lazily: a region reads, from each part, only the
    groups it covers (whole groups; the region is cut out of them)."""

    def __init__(self, parts: list[LazyTensor], sizes: tuple[int, ...], dim: int = 0):
        groups = {p.shape[dim] // s for p, s in zip(parts, sizes)}
        if len(groups) != 1 or any(p.shape[dim] % s for p, s in zip(parts, sizes)):
            raise ValueError(f"cannot interleave shapes {[p.shape for p in parts]} in groups of {sizes}")
        self.parts, self.sizes, self.dim = parts, tuple(sizes), dim
        shape = list(parts[0].shape)
        shape[dim] = groups.pop() * sum(sizes)
        self.shape = tuple(shape)

    def read(self, index: Index) -> torch.Tensor:
        from distill.models.fused import interleave

        d, want, unit = self.dim, index[self.dim], sum(self.sizes)
        g0, g1 = want.start // unit, -(-want.stop // unit)
        pieces, offset = [], 0
        for part, s in zip(self.parts, self.sizes):
            # this part's rows inside the region: one contiguous range of the part (whole groups between a
            # partial first and last one); read exactly those, placed in zeros that complete the groups
            a = g0 * s + min(max(want.start - g0 * unit - offset, 0), s)
            b = (g1 - 1) * s + min(max(want.stop - (g1 - 1) * unit - offset, 0), s) if g1 > g0 else a
            got = part.read(index[:d] + (slice(a, b),) + index[d + 1 :])
            shape = list(got.shape)
            shape[d] = (g1 - g0) * s
            block = got.new_zeros(shape)
            block.narrow(d, a - g0 * s, b - a).copy_(got)
            pieces.append(block)
            offset += s
        return interleave(pieces, self.sizes, d).narrow(d, want.start - g0 * unit, want.stop - want.start)


def lazy_reader(tensors: Mapping[str, LazyTensor], key: str = "teacher.path") -> Reader:
    """``read(name, index)`` over named lazy tensors; an unknown name is a ConfigError naming `key`."""

    def read(name: str, index: Index) -> torch.Tensor:
        if name not in tensors:
            raise ConfigError(key, f"the weights lack the tensor `{name}`.")
        return tensors[name].read(index)

    return read


# ---------------------------------------------------------------------------------------------- models


def mesh_device(mesh: Any) -> torch.device:
    """The device this rank's shards live on: the CPU, or the current accelerator of the mesh's type."""
    kind = getattr(mesh, "device_type", "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    module = getattr(torch, kind)
    return torch.device(kind, module.current_device())


def build_sharded(cfg: Any, mesh: Any, read: Reader, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A GPT of `cfg` laid out on `mesh` (a ParallelMesh) with its weights from `read`, each rank reading only
    its regions; frozen (eval mode, no gradients). Collective: every rank calls it with the same arguments.
    Check the weights files before calling (errors must come before any collective).

    Every FSDP module, the root included, reshards after its forward: a teacher has no backward that would
    free the gathered parameters, so between forwards each rank holds only its shards. The forward may be
    called under inference mode (`distill.parallel.parallelize.parallelize_frozen`)."""
    from distill.models import GPT
    from distill.parallel.parallelize import parallelize_frozen

    with torch.device("meta"):
        model = GPT(cfg).to(dtype)
    parallelize_frozen(model, mesh)
    model.to_empty(device=mesh_device(mesh))
    load_sharded_(model, read)
    return model.eval().requires_grad_(False)
