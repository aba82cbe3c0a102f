"""Weights read from ``.safetensors`` files by memory-mapping them: no copy in memory.

Each tensor is a view (``torch.frombuffer``) of a private, copy-on-write mapping of its
file, so the weights occupy memory only as page-cache pages touched through the
mapping, and ``release()`` drops those pages from the process (``MADV_DONTNEED``: the
next read faults them in from the file again). A write to a tensor would only change
this process's private copy of the page, never the file.

The format (``safetensors`` spec): an 8-byte little-endian header length N, N bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data, offsets relative to its start. Every check a damaged file can fail is an
``InputError`` naming the file.
"""
from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from pathlib import Path
from typing import Iterable

import torch

from ..errors import InputError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAX_HEADER = 100 << 20
_HINT = "the file is truncated or not a safetensors file: download or save it again"


class MappedFile:
    """One memory-mapped ``.safetensors`` file and the tensors viewing it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 8:
            raise InputError(f"{str(self.path)!r} is too short to be a safetensors file ({size} bytes)", _HINT)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(_MAX_HEADER, size - 8):
                raise InputError(f"{str(self.path)!r} has a bad safetensors header length ({n} bytes)", _HINT)
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(f"{str(self.path)!r} has an unreadable safetensors header ({exc})", _HINT) from exc
        if not isinstance(header, dict):
            raise InputError(f"{str(self.path)!r} has a safetensors header that is not a JSON object", _HINT)
        self.metadata = header.pop("__metadata__", None) or {}
        self.start = 8 + n
        self.entries = {name: self._check(name, entry, size - self.start) for name, entry in header.items()}
        self._file = open(self.path, "rb")
        # ACCESS_COPY: writable views (torch.frombuffer wants one) whose writes stay private
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self._tensors: dict[str, torch.Tensor] = {}

    def _check(self, name: str, entry, data_size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{str(self.path)!r}: tensor {name!r} has a bad header entry ({entry!r})",
                             _HINT) from exc
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if begin < 0 or end - begin != nbytes or end > data_size or any(s < 0 for s in shape):
            raise InputError(f"{str(self.path)!r}: tensor {name!r} ({entry['dtype']} {list(shape)}) lies outside "
                             f"the file's {data_size} data bytes (offsets {begin}..{end})", _HINT)
        return dtype, shape, begin, end

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``: a view of the mapping (no copy; read on first touch)."""
        if name not in self._tensors:
            dtype, shape, begin, end = self.entries[name]
            if end == begin:
                t = torch.empty(shape, dtype=dtype)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    t = torch.frombuffer(self._map, dtype=dtype, offset=self.start + begin,
                                         count=(end - begin) // torch.empty((), dtype=dtype).element_size())
                t = t.view(shape)
            self._tensors[name] = t
        return self._tensors[name]

    def release(self) -> None:
        """Drop this process's resident pages of the file (they are read again on use)."""
        if self._map is not None and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def release_range(self, tensor: torch.Tensor) -> bool:
        """Drop the resident pages lying wholly inside ``tensor``'s bytes, if it views this
        file (True then). Valid as long as nothing wrote to the tensor: a dropped private
        page is read back from the file."""
        if self._map is None or not hasattr(self._map, "madvise") or tensor.numel() == 0:
            return False
        import ctypes

        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        start = tensor.data_ptr() - base
        end = start + tensor.numel() * tensor.element_size()
        if start < 0 or end > len(self._map):
            return False
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
        return True


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_M_MMAP_THRESHOLD = -3


def heap_returns_large_blocks() -> None:
    """glibc serves blocks above a threshold with their own mapping, returned to the system
    on free; the threshold grows with the blocks freed (up to 32 MiB), after which a pass's
    per-layer temporaries stay in the heap as fragments and the resident set only grows.
    Fixing it at 1 MiB keeps a layer-by-layer pass at one layer's temporaries (no-op off glibc)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def trim_heap() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class MappedWeights:
    """The tensors of one or more mapped ``.safetensors`` files, by name.

    A graph built from them keeps this object in ``graph.meta["mapped_weights"]``: the
    compiler then shares weights between the graph and its reference copies instead of
    copying them, and calls ``release()`` between stages (see ``compiler.py``)."""

    def __init__(self, paths: Iterable[str | Path]):
        self.files = [MappedFile(p) for p in paths]
        heap_returns_large_blocks()
        self.where: dict[str, MappedFile] = {}
        for f in self.files:
            for name in f.entries:
                if name in self.where:
                    raise InputError(f"tensor {name!r} is stored twice ({self.where[name].path.name} and "
                                     f"{f.path.name})", "remove the duplicate shard")
                self.where[name] = f

    def __deepcopy__(self, memo):   # graph.meta is deep-copied by Graph.clone: the mapping is shared
        return self

    def names(self) -> list[str]:
        return list(self.where)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: f.tensor(name) for name, f in self.where.items()}

    @property
    def nbytes(self) -> int:
        return sum(e - b for f in self.files for _, _, b, e in f.entries.values())

    def release(self) -> None:
        for f in self.files:
            f.release()


def release_pages(graph, tensor: torch.Tensor | None = None) -> None:
    """Drop the resident pages of a graph's memory-mapped weights (no-op for others);
    ``tensor``: only that weight's (a pass that has replaced it: its float form is not
    needed until the original graph runs again, which reads it back from the file)."""
    mapped = getattr(graph, "meta", {}).get("mapped_weights")
    if mapped is None:
        return
    if tensor is None:
        mapped.release()
        trim_heap()
    else:
        any(f.release_range(tensor) for f in mapped.files)


def read_weights(paths: Iterable[str | Path]) -> MappedWeights:
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise InputError(f"weights file {str(p)!r} does not exist", "check the path (or the shard index)")
    return MappedWeights(paths)


__all__ = ["MappedFile", "MappedWeights", "read_weights", "release_pages"]
