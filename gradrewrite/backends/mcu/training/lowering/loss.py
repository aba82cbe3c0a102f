"""The loss: cross-entropy as log-softmax (``gr_expf``/``gr_logf``, reproducible by the
integer reference) then negative log-likelihood, and their backward."""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from ...inference.lowering.base import Unsupported, float_in, shape_of
from ...program import Val, contiguous_strides, numel
from .base import aten, emit, train_handles
from .lowerer import TrainLowerer


@train_handles(aten.nll_loss_forward.default)
def _nll(lw: TrainLowerer, node: fx.Node) -> tuple:
    logp_node, target_node, weight, reduction, ignore = (list(node.args) + [None] * 5)[:5]
    if weight is not None or int(reduction) not in (1, 2):
        raise Unsupported("class weights or reduction='none'")
    logp, target = float_in(lw, logp_node), lw.contig(lw.val(target_node))
    if target.dtype != "i64" or len(logp.shape) != 2:
        raise Unsupported("cross-entropy needs (batch, classes) scores and int64 labels")
    loss, tw = lw.new((), "f32", name="loss"), lw.new((), "f32", name="total_weight")
    n, c = logp.shape
    emit(lw, "gr_nll_loss_f32", f"gr_nll_loss_f32({logp.ptr()}, {target.ptr()}, {loss.out()}, {tw.out()}, "
         f"{n}, {c}, {int(ignore)}, {int(int(reduction) == 1)});", [logp, target], [loss, tw])
    return (loss, tw)


@train_handles(aten.ones_like.default)
def _ones_like(lw: TrainLowerer, node: fx.Node) -> Val:
    shape = shape_of(node)
    buf = lw.add_const(node.name, np.ones(max(1, numel(shape)), np.float32), "f32")
    return Val(buf, shape, contiguous_strides(shape))


@train_handles(aten.nll_loss_backward.default)
def _nll_bwd(lw: TrainLowerer, node: fx.Node) -> Val:
    g_node, logp_node, target_node, weight, reduction, ignore, tw_node = node.args[:7]
    if weight is not None or int(reduction) not in (1, 2):
        raise Unsupported("class weights or reduction='none'")
    g, target, tw = lw.contig(lw.val(g_node)), lw.contig(lw.val(target_node)), lw.contig(lw.val(tw_node))
    n, c = shape_of(node)
    gx = lw.new((n, c), "f32")
    emit(lw, "gr_nll_loss_bwd_f32", f"gr_nll_loss_bwd_f32({g.ptr()}, {target.ptr()}, {tw.ptr()}, {gx.out()}, "
         f"{n}, {c}, {int(ignore)}, {int(int(reduction) == 1)});", [g, target, tw], [gx])
    return gx


@train_handles(aten._log_softmax_backward_data.default)
def _log_softmax_bwd(lw: TrainLowerer, node: fx.Node) -> Val:
    g, out = float_in(lw, node.args[0]), float_in(lw, node.args[1])
    if int(node.args[2]) % len(g.shape) != len(g.shape) - 1:
        raise Unsupported("log-softmax over a dimension other than the last")
    cols = g.shape[-1]
    gx = lw.new(g.shape, "f32")
    emit(lw, "gr_log_softmax_bwd_f32", f"gr_log_softmax_bwd_f32({g.ptr()}, {out.ptr()}, {gx.out()}, "
         f"{g.numel // cols}, {cols});", [g, out], [gx])
    return gx


@train_handles(aten._log_softmax.default)
def _log_softmax(lw: TrainLowerer, node: fx.Node) -> Val:
    """The training step's log-softmax: gr_expf / gr_logf (reproducible by the reference)."""
    x = float_in(lw, node.args[0])
    if int(node.args[1]) % len(x.shape) != len(x.shape) - 1 or node.args[2]:
        raise Unsupported("log-softmax over a dimension other than the last")
    cols = x.shape[-1]
    y = lw.new(x.shape, "f32")
    emit(lw, "gr_log_softmax_tr_f32", f"gr_log_softmax_tr_f32({x.ptr()}, {y.out()}, {x.numel // cols}, {cols});",
         [x], [y])
    return y
