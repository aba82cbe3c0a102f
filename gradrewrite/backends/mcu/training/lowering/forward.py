"""The forward with trained weights: convolutions and linear layers (addmm) whose
weight is a run-time array (SRAM) rather than a constant, split weights read as their
trained and frozen parts, and slices of a split parameter (its trained rows)."""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from .....rewrite.graph import op_name
from .....rewrite import int8_layers as int8
from ...inference.lowering.base import HANDLERS, Unsupported, conv_shape, float_in, shape_of
from ...program import Val
from .. import device_form as dev
from . import int8 as s8
from .base import aten, split_parts, train_handles
from .buffers import SplitBuf
from .lowerer import TrainLowerer


@train_handles(aten.convolution.default)
def _conv(lw: TrainLowerer, node: fx.Node) -> Val:
    w_node = node.args[1]
    b_node = node.args[2]
    if lw.is_const(w_node) and (b_node is None or lw.is_const(b_node)):
        return HANDLERS[node.target](lw, node)
    c = int8._conv_params(node)
    if c is None:
        raise Unsupported("transposed convolution")
    x = float_in(lw, node.args[0])
    wv = lw.val(w_node)
    b = lw.contig(lw.val(b_node)) if b_node is not None else None
    ys = shape_of(node)
    if isinstance(wv.buf, SplitBuf):
        return _conv_split(lw, node, x, wv.buf, b, ys, c)
    w = lw.contig(wv)
    y = lw.new(ys, "f32")
    s, macs = conv_shape(x.shape, w.shape, ys, c)
    code = (f"{{ {s}\n  gr_conv2d_f32(&s, {x.ptr()}, {w.ptr()}, {b.ptr() if b else 'NULL'}, {y.out()}, "
            f"@lo@, @hi@); }}")
    step = lw.emit("gr_conv2d_f32", "gr_conv.c", code, [x, w] + ([b] if b else []), [y], macs,
                   params={"lo": -np.inf, "hi": np.inf})
    lw._fusable[node] = step
    return y


def _conv_split(lw: TrainLowerer, node: fx.Node, x: Val, split: SplitBuf, b: Val | None, ys, c) -> Val:
    """Trained filters from SRAM, frozen ones from flash: per image, two conv calls
    writing the two channel ranges of the output (one step, so an activation fuses)."""
    n, cin, h, w_ = x.shape
    oc, oh, ow = ys[1:]
    y = lw.new(ys, "f32")
    code, macs = [], 0
    for oc0, part, ic0, ic, groups in split_parts(split, c, cin):
        k = part.shape[0]
        s, m = conv_shape((1, ic, h, w_), part.shape, (1, k, oh, ow), {**c, "groups": groups})
        macs += m * n
        bptr = Val(b.buf, (k,), (1,), b.offset + oc0).ptr() if b is not None else "NULL"
        code.append(f"{{ {s}")
        for i in range(n):
            xi = Val(x.buf, (ic, h, w_), (h * w_, w_, 1), x.offset + (i * cin + ic0) * h * w_)
            yi = Val(y.buf, (k, oh, ow), (oh * ow, ow, 1), y.offset + (i * oc + oc0) * oh * ow)
            code.append(f"  gr_conv2d_f32(&s, {xi.ptr()}, {part.ptr()}, {bptr}, {yi.out()}, @lo@, @hi@);")
        code.append("}")
    reads = [x, split.trained, split.rest] + ([b] if b is not None else [])
    step = lw.emit("gr_conv2d_f32", "gr_conv.c", "\n".join(code), reads, [y], macs,
                   params={"lo": -np.inf, "hi": np.inf}, op=op_name(node) + " (split weight)")
    lw._fusable[node] = step
    return y


@train_handles(aten.slice.Tensor)
def _slice(lw: TrainLowerer, node: fx.Node) -> Val:
    """Leading rows of a split parameter are its trained part."""
    if s8.dq_of(lw, node.args[0]) is not None:
        lw._raw_views = True
        try:
            return HANDLERS[node.target](lw, node)
        finally:
            lw._raw_views = False
    v = lw.val(node.args[0])
    if not isinstance(v.buf, SplitBuf):
        return HANDLERS[node.target](lw, node)
    a = list(node.args) + [None] * 5
    shape = shape_of(node)
    if int(a[1] or 0) != 0 or int(a[2] or 0) != 0 or int(a[4] or 1) != 1 or shape[0] > v.buf.rows:
        raise Unsupported("a slice beyond the trained rows of a partially trained parameter")
    t = v.buf.trained
    return Val(t.buf, shape, t.strides, t.offset)


@train_handles(aten.addmm.default)
def _addmm(lw: TrainLowerer, node: fx.Node) -> Val:
    b_node, x_node, wt_node = node.args[:3]
    if lw.is_const(wt_node) and lw.is_const(b_node):
        return HANDLERS[node.target](lw, node)
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        raise Unsupported("addmm with alpha/beta")
    x = float_in(lw, x_node)
    wt = lw.val(wt_node)  # (k, n_out): usually permute(weight)
    b = lw.contig(lw.val(b_node))
    if isinstance(wt.buf, SplitBuf):
        return _linear_split(lw, node, x, wt.buf, b)
    w = lw.contig(Val(wt.buf, (wt.shape[1], wt.shape[0]), (wt.strides[1], wt.strides[0]), wt.offset))
    n_out, k = w.shape
    rows = x.numel // k
    y = lw.new(shape_of(node), "f32")
    code = f"gr_linear_f32({x.ptr()}, {w.ptr()}, {b.ptr()}, {y.out()}, {rows}, {k}, {n_out}, @lo@, @hi@);"
    step = lw.emit("gr_linear_f32", "gr_linalg.c", code, [x, w, b], [y], rows * k * n_out,
                   params={"lo": -np.inf, "hi": np.inf})
    lw._fusable[node] = step
    return y


def _linear_split(lw: TrainLowerer, node: fx.Node, x: Val, split: SplitBuf, b: Val) -> Val:
    """Trained output rows from SRAM, the rest from flash: per input row, two calls."""
    ys = shape_of(node)
    n_out, k = ys[-1], x.shape[-1]
    rows = x.numel // k
    if split.trained.shape[1:] != (k,):
        raise Unsupported("the split weight is not the (out, in) weight of this linear layer")
    y = lw.new(ys, "f32")
    code = []
    for r in range(rows):
        for o0, part in ((0, split.trained), (split.rows, split.rest)):
            m = part.shape[0]
            xr = Val(x.buf, (k,), (1,), x.offset + r * k)
            yr = Val(y.buf, (m,), (1,), y.offset + r * n_out + o0)
            br = Val(b.buf, (m,), (1,), b.offset + o0)
            code.append(f"gr_linear_f32({xr.ptr()}, {part.ptr()}, {br.ptr()}, {yr.out()}, 1, {k}, {m}, @lo@, @hi@);")
    step = lw.emit("gr_linear_f32", "gr_linalg.c", "\n".join(code), [x, split.trained, split.rest, b], [y],
                   rows * k * n_out, params={"lo": -np.inf, "hi": np.inf}, op=op_name(node) + " (split weight)")
    lw._fusable[node] = step
    return y


@train_handles(*dev.PADS)
def _pad(lw: TrainLowerer, node: fx.Node) -> Val:
    """A pad of width 0 is its input; one that only crops (a pad's backward,
    ``constant_pad_nd(g, [-1, -1, ...])``) a copy of that view; others as in inference."""
    widths = dev.pad_widths(node)
    if widths is None or any(v > 0 for v in widths):
        return HANDLERS[node.target](lw, node)
    x = lw.val(node.args[0])
    shape, offset = list(x.shape), x.offset
    for i in range(len(widths) // 2):
        d = len(shape) - 1 - i
        lo, hi = -widths[2 * i], -widths[2 * i + 1]
        offset += lo * x.strides[d]
        shape[d] -= lo + hi
    return lw.contig(Val(x.buf, tuple(shape), x.strides, offset))  # readers may update it in place


@train_handles(*dev.DROPOUTS)
def _dropout(lw: TrainLowerer, node: fx.Node) -> Val:
    if dev.identity_of(node) is None:
        raise Unsupported("dropout in training mode (capture the model in eval mode: dropout is then the identity)")
    return lw.val(node.args[0])
