"""The lowered program: buffers, tensor views on them, and the kernel call sequence.

A ``Program`` is what the code generator writes out: every activation lives in an
arena ``Buf`` (planned later), weights in ``const`` ones (flash), model inputs in the
caller's input bytes. A ``Val`` is a strided view on a buffer, so reshape, transpose,
slice and split cost nothing until a kernel needs contiguous data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CTYPES = {"f32": "float", "i8": "int8_t", "i32": "int32_t", "i64": "int64_t", "u8": "uint8_t"}
ITEMSIZE = {"f32": 4, "i8": 1, "i32": 4, "i64": 8, "u8": 1}
TORCH_DTYPES = {"float32": "f32", "int8": "i8", "int32": "i32", "int64": "i64", "uint8": "u8"}


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


@dataclass(eq=False)
class Buf:
    """Storage: ``arena`` (planned), ``const`` (weights.c) or ``input`` (caller's bytes)."""

    name: str
    kind: str
    nbytes: int
    dtype: str
    data: np.ndarray | None = None      # const only
    offset: int = 0                     # input: byte offset in the packed input
    inplace_of: "Buf | None" = None     # arena: may overwrite this buffer (planner decides)

    def expr(self) -> str:
        """C expression for the buffer's first byte (arena offsets are macros)."""
        if self.kind == "const":
            return f"(const uint8_t *){self.name}"
        if self.kind == "input":
            return f"(in_bytes + {self.offset})"
        return f"(arena + {self.name.upper()}_OFF)"


@dataclass
class Val:
    """A strided view on a buffer (element offset and strides)."""

    buf: Buf
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0

    @property
    def dtype(self) -> str:
        return self.buf.dtype

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    def is_contiguous(self) -> bool:
        return all(st == cs for st, cs, sz in zip(self.strides, contiguous_strides(self.shape), self.shape)
                   if sz != 1)

    def ptr(self, const: bool = True) -> str:
        ctype = CTYPES[self.dtype]
        q = "const " if const else ""
        base = f"({q}{ctype} *)(void *){self.buf.expr()}" if self.buf.kind != "const" else self.buf.name
        if self.buf.kind == "const" and self.buf.dtype != self.dtype:
            base = f"({q}{ctype} *){self.buf.name}"
        return f"({base} + {self.offset})" if self.offset else base

    def out(self) -> str:
        return self.ptr(const=False)


@dataclass
class Step:
    """One kernel call (C statements) with the buffers it reads and writes."""

    op: str                   # ATen op (or pattern) it implements
    path: str                 # module path, for reports
    code: str                 # C statements; @lo@/@hi@ filled for a fused activation
    reads: list[Buf]
    writes: list[Buf]
    kernel: str               # kernel function, for the per-op report
    macs: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        code = self.code
        for k, v in self.params.items():
            code = code.replace(f"@{k}@", c_float(v) if isinstance(v, float) else str(v))
        return code


@dataclass
class Program:
    inputs: list[Val]
    outputs: list[Val]
    steps: list[Step]
    consts: list[Buf]
    arena: list[Buf]
    kernel_files: set[str]
    notes: dict[str, Any] = field(default_factory=dict)


def c_float(v: float) -> str:
    """A float32 literal that C reads back exactly (hex floats are C99)."""
    v = float(np.float32(v))
    if math.isinf(v):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    if math.isnan(v):
        return "NAN"
    return v.hex() + "f"


def c_ints(values) -> str:
    return "{" + ", ".join(str(int(v)) for v in values) + "}"
