"""The float classifier head of an int8 step (``..float_head``): its forward
(``gr_linear_tr_f32``) and its backward through a float weight / from a float input
(``gr_linear_bwd_input_f32`` / ``gr_linear_bwd_weight_f32``); its update is ``gr_sgd_f32``
(``update.py``: a float parameter has no integer storage)."""
from __future__ import annotations

import torch.fx as fx

from ...inference.lowering.base import Unsupported, float_in, shape_of
from ...program import Val
from .. import float_head as fh
from .base import emit, train_handles
from .buffers import SplitBuf
from .lowerer import TrainLowerer

HEAD_C, HEAD_H = "gr_float_head.c", "gr_float_head.h"   # the forward kernel's own files


def _head_weights(lw: TrainLowerer) -> tuple[str, ...]:
    return tuple(lw.graph.meta.get("int8_train", {}).get("float_head", ()))


def is_head_weight(lw: TrainLowerer, node) -> bool:
    """Whether ``node`` is the float head's weight (``..float_head.rewrite_head``)."""
    return isinstance(node, fx.Node) and str(node.target) in _head_weights(lw)


def is_head_grad(lw: TrainLowerer, node: fx.Node) -> bool:
    """Whether a linear weight gradient is the float head's: an update of a head weight reads it."""
    todo = list(node.users)
    while todo:
        u = todo.pop()
        if u.meta.get("custom", {}).get("writes") in _head_weights(lw):
            return True
        todo.extend(u.users)
    return False


def _param(lw: TrainLowerer, node: fx.Node) -> Val:
    """A float head parameter: its flash array when frozen, its SRAM array when trained."""
    if lw.is_const(node):
        return lw.const_val(node, "f32")
    v = lw.val(node)
    if isinstance(v.buf, SplitBuf):   # device_form refuses these; kept as a guard
        raise Unsupported("a partially trained float classifier")
    return lw.contig(v)


@train_handles(fh.float_linear)
def _float_linear(lw: TrainLowerer, node: fx.Node) -> Val:
    x = float_in(lw, node.args[0])
    w = _param(lw, node.args[1])
    b = _param(lw, node.args[2]) if node.args[2] is not None else None
    n_out, k = w.shape
    rows = x.numel // k
    y = lw.new(shape_of(node), "f32")
    bptr = b.ptr() if b is not None else "NULL"
    lw.emit("gr_linear_tr_f32", HEAD_C, f"gr_linear_tr_f32({x.ptr()}, {w.ptr()}, {bptr}, {y.out()}, {rows}, {k}, "
            f"{n_out});", [x, w] + ([b] if b is not None else []), [y], rows * k * n_out)
    lw.kernel_files.add(HEAD_H)
    return y


def bwd_input(lw: TrainLowerer, node: fx.Node) -> Val:
    """gx = g @ w through the float head's weight (out x in)."""
    g, w = lw.contig(lw.val(node.args[0])), _param(lw, node.args[1])
    rows, nout = g.shape
    kin = w.shape[1]
    gx = lw.new(shape_of(node), "f32")
    emit(lw, "gr_linear_bwd_input_f32", f"gr_linear_bwd_input_f32({g.ptr()}, {w.ptr()}, {gx.out()}, {rows}, "
         f"{kin}, {nout});", [g, w], [gx], rows * kin * nout)
    return gx


def bwd_weight(lw: TrainLowerer, node: fx.Node) -> Val:
    """gw = g^T @ x from the head's float input."""
    g, x = lw.contig(lw.val(node.args[0])), float_in(lw, node.args[1])
    rows, nout = g.shape
    kin = x.shape[-1]
    gw = lw.new((nout, kin), "f32")
    emit(lw, "gr_linear_bwd_weight_f32", f"gr_linear_bwd_weight_f32({g.ptr()}, {x.ptr()}, {gw.out()}, {rows}, "
         f"{kin}, {nout});", [g, x], [gw], rows * kin * nout)
    return gw
