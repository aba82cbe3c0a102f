"""What every lowering module shares: the ``Unsupported`` error, the op handler table
and small helpers over node metadata and kernel shape structs.

A handler is ``fn(lowerer, node) -> Val | tuple | None``, registered for one or more
ATen targets with ``@handles``; ``Lowerer`` looks a node's target up in ``HANDLERS``.
The op-family modules of this package register theirs when the package is imported.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import torch
import torch.fx as fx

from ..nm import NMWeight
from ...program import TORCH_DTYPES, Buf, Val, numel

aten = torch.ops.aten
INF = math.inf


class Unsupported(Exception):
    """This node cannot be generated; the message says why."""


def registrar(table: dict[Any, Callable[..., Any]]):
    """The decorator ``@register(*targets)`` that enters a handler in ``table`` for each target."""
    def register(*targets):
        def deco(fn):
            for t in targets:
                table[t] = fn
            return fn
        return deco
    return register


HANDLERS: dict[Any, Callable[..., Any]] = {}   # ATen target -> handler(lowerer, node)
handles = registrar(HANDLERS)


def ident(name: str) -> str:
    return re.sub(r"\W", "_", name)


def kernel_dtype(t: torch.dtype) -> str:
    name = str(t).removeprefix("torch.")
    if name not in TORCH_DTYPES:
        raise Unsupported(f"dtype {name} has no C kernels")
    return TORCH_DTYPES[name]


def val_meta(node: fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise Unsupported("output shape unknown")
    return val


def shape_of(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in val_meta(node).shape)


def pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def float_in(lw, node: Any) -> Val:
    """``node``'s value as a contiguous float32 tensor (a copy when it is a strided view)."""
    v = lw.contig(lw.val(node))
    if v.dtype != "f32":
        raise Unsupported(f"expects float32 input, got {v.dtype}")
    return v


def conv_shape(xs, ws, ys, c) -> tuple[str, int]:
    """The ``gr_conv_shape`` struct of a convolution and its multiply-accumulates."""
    (sh, sw), (ph, pw), (dh, dw), groups = c["stride"], c["padding"], c["dilation"], c["groups"]
    s = (f"static const gr_conv_shape s = {{{xs[0]}, {xs[1]}, {xs[2]}, {xs[3]}, {ys[1]}, {ys[2]}, "
         f"{ys[3]}, {ws[2]}, {ws[3]}, {sh}, {sw}, {ph}, {pw}, {dh}, {dw}, {groups}}};")
    macs = numel(ys) * ws[1] * ws[2] * ws[3]
    return s, macs


def pool_shape(x: Val, ys, k, s, p, d, cip=1, div=0) -> str:
    """The ``gr_pool_shape`` struct of a 2-D pooling over NCHW ``x``."""
    return (f"static const gr_pool_shape s = {{{x.shape[0] * x.shape[1]}, {x.shape[2]}, {x.shape[3]}, "
            f"{ys[2]}, {ys[3]}, {k[0]}, {k[1]}, {s[0]}, {s[1]}, {p[0]}, {p[1]}, {d[0]}, {d[1]}, {cip}, {div}}};")


def nm_struct(p: NMWeight, idx: Buf) -> str:
    """The ``gr_nm`` struct of an N:M packed weight whose index bitstream is ``idx``."""
    return f"static const gr_nm p = {{{p.n}, {p.m}, {p.bits}, {p.groups}, {p.k}, {idx.name}}};"
