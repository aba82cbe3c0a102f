"""The optimizer update, in place: SGD ``sub(w, mul(g, lr))`` as ``gr_sgd_f32`` (integer
updates with QAS factors for int8 weights / int32 biases), the momentum buffer's
update, and the round/clamp/slice_scatter ops the update kernels already cover."""
from __future__ import annotations

import torch.fx as fx

from ...inference.lowering.base import HANDLERS, Unsupported
from ...program import Val, c_float
from . import int8 as s8
from .base import aten, emit, train_handles
from .buffers import SplitBuf, TrainedBuf
from .lowerer import TrainLowerer
from .patterns import momentum_parts, param_attr, update_chain, update_factor


def _prefix(v: Val) -> Val:
    """A view that is a contiguous run of its buffer (e.g. the first rows)."""
    if not v.is_contiguous():
        raise Unsupported("the update target is not a contiguous block of its parameter")
    return v


@train_handles(aten.sub.Tensor)
def _sub(lw: TrainLowerer, node: fx.Node) -> Val:
    chain = update_chain(node)
    if chain is None:
        if node.meta.get("custom", {}).get("writes"):
            raise Unsupported("an in-place update that is not SGD (w - lr * g)")
        return HANDLERS[node.target](lw, node)
    w_node, g_node, factors, _, lr_graph = chain
    if abs(lr_graph - float(lw.ts["optimizer"]["lr"])) > 1e-12 * max(1.0, abs(lr_graph)):
        raise Unsupported("the update is scaled by a constant other than the learning rate")
    w, g = _prefix(lw.val(w_node)), lw.contig(lw.val(g_node))
    if not isinstance(w.buf, TrainedBuf):
        raise Unsupported("the update writes a parameter that is not trained")
    if g.numel != w.numel:
        raise Unsupported("gradient and parameter sizes differ")
    store = lw._int_store.get(param_attr(w_node) or "")
    if store is not None:  # an int8 weight / int32 bias: QAS, rounding, saturation
        rows = w.shape[0] if w.shape else 1
        s8.sgd_int(lw, w, g, update_factor(lw.graph, factors, store[1], rows), store[0], rows, store[2],
                   g_only_here=len(g_node.users) == 1)
        return w
    if factors:
        raise Unsupported("the update is scaled by more than the learning rate (QAS needs an int8 weight)")
    emit(lw, "gr_sgd_f32", f"gr_sgd_f32({w.out()}, {g.ptr()}, lr, {w.numel});", [w, g], [w])
    return w


@train_handles(aten.add.Tensor)
def _add(lw: TrainLowerer, node: fx.Node) -> Val:
    """The momentum buffer's update v = momentum * v + g, in place."""
    parts = momentum_parts(node)
    if parts is None:
        return HANDLERS[node.target](lw, node)
    v_node, g_node, momentum = parts
    v, g = _prefix(lw.val(v_node)), lw.contig(lw.val(g_node))
    if not isinstance(v.buf, TrainedBuf) or g.numel != v.numel:
        raise Unsupported("a momentum update of another shape")
    emit(lw, "gr_momentum_f32", f"gr_momentum_f32({v.out()}, {g.ptr()}, {c_float(momentum)}, {v.numel});",
         [v, g], [v])
    return v


@train_handles(aten.round.default, aten.clamp.default)
def _saturate(lw: TrainLowerer, node: fx.Node) -> Val:
    """round/clamp after an integer update: the update kernel already rounds and saturates."""
    v = lw.vals.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if node.meta.get("custom", {}).get("train_role") == "update" and isinstance(v, Val) \
            and isinstance(v.buf, TrainedBuf) and v.buf.dtype in ("i8", "i32"):
        return v
    if node.target not in HANDLERS:
        raise Unsupported("no C kernel for this op")
    return HANDLERS[node.target](lw, node)


@train_handles(aten.slice_scatter.default)
def _slice_scatter(lw: TrainLowerer, node: fx.Node) -> Val:
    """The partial-channel update already wrote the first rows in place."""
    base, src = lw.val(node.args[0]), lw.val(node.args[1])
    a = list(node.args) + [0, 0, None, 1]
    target = base.buf.trained if isinstance(base.buf, SplitBuf) else base
    if not node.meta.get("custom", {}).get("writes") or int(a[2]) != 0 or int(a[3]) != 0 \
            or src.buf is not target.buf or src.offset != target.offset:
        raise Unsupported("slice_scatter other than a leading-rows in-place update")
    return base
