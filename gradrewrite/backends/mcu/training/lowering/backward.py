"""The backward ops autograd emits for the layers the forward kernels cover: relu /
relu6 backward, convolution backward (input, weight and bias gradients; through a split
weight), and pooling backward (max pooling records its indices for it)."""
from __future__ import annotations

import torch.fx as fx

from .....rewrite.graph import op_name
from ...inference.lowering.base import (HANDLERS, Unsupported, conv_shape, float_in, pair, pool_shape,
                                        shape_of, val_meta)
from ...program import Val, c_float
from . import int8 as s8
from .base import TRAIN_FILE, aten, emit, split_parts, train_handles
from .buffers import MaskedBcast, SplitBuf
from .lowerer import TrainLowerer


@train_handles(aten.threshold_backward.default, aten.hardtanh_backward.default)
def _act_bwd(lw: TrainLowerer, node: fx.Node) -> Val:
    """relu (threshold) / relu6 (hardtanh) backward: gx = gy where the forward value
    passed; reading an int8 output, the int8 kernels (int8.py)."""
    d = s8.dq_of(lw, node.args[1])
    if d is not None:
        return s8.act_bwd(lw, node, d)
    g, y = float_in(lw, node.args[0]), float_in(lw, node.args[1])
    gx = lw.new(g.shape, "f32", inplace_of=g)
    bounds = ", ".join(c_float(float(b)) for b in node.args[2:])   # threshold, or lo and hi
    kernel = "gr_threshold_bwd_f32" if node.target == aten.threshold_backward.default else "gr_hardtanh_bwd_f32"
    emit(lw, kernel, f"{kernel}({g.ptr()}, {y.ptr()}, {bounds}, {gx.out()}, {g.numel});", [g, y], [gx])
    return gx


CMP = {aten.le.Scalar: "GR_LE", aten.ge.Scalar: "GR_GE", aten.lt.Scalar: "GR_LT", aten.gt.Scalar: "GR_GT"}


@train_handles(*CMP)
def _compare(lw: TrainLowerer, node: fx.Node) -> None:
    """A comparison with a scalar is computed inside the ``where`` that selects by it
    (hardswish / hardsigmoid backward, as autograd decomposes them); no mask is stored."""
    if not all(u.target == aten.where.self and u.args[0] is node for u in node.users):
        raise Unsupported("a comparison read other than as a where's condition")
    return None


@train_handles(aten.where.self)
def _where(lw: TrainLowerer, node: fx.Node) -> Val:
    """where(x OP s, a, b), a and b each of the output's shape or a constant scalar:
    ``gr_where_cmp_f32``, exact per element."""
    cond, a, b = node.args
    if not (isinstance(cond, fx.Node) and cond.target in CMP and isinstance(cond.args[1], (int, float))):
        raise Unsupported("a where whose condition is not a comparison with a scalar")
    ys = shape_of(node)
    x = float_in(lw, cond.args[0])
    if x.shape != ys:
        raise Unsupported("a where with broadcasting")
    reads, ptrs = [x], []
    for v in (a, b):
        if not isinstance(v, fx.Node) or lw.is_const(v) and lw.const_value(v).numel() == 1:
            c = float(lw.const_value(v)) if isinstance(v, fx.Node) else float(v)
            ptrs.append(f"NULL, {c_float(c)}")
            continue
        t = float_in(lw, v)
        if t.shape != ys:
            raise Unsupported("a where with broadcasting")
        reads.append(t)
        ptrs.append(f"{t.ptr()}, 0.0f")
    y = lw.new(ys, "f32")
    emit(lw, "gr_where_cmp_f32", f"gr_where_cmp_f32({CMP[cond.target]}, {x.ptr()}, {c_float(float(cond.args[1]))}, "
         f"{ptrs[0]}, {ptrs[1]}, {y.out()}, {x.numel});", reads, [y])
    return y


@train_handles(aten.sigmoid.default)
def _sigmoid(lw: TrainLowerer, node: fx.Node) -> Val:
    """An int8 step's sigmoid gate computes exp with gr_expf, which the integer reference
    mirrors bit for bit (libm's expf it cannot); an fp32 step keeps the inference kernel."""
    if not lw.int8:
        return HANDLERS[node.target](lw, node)
    x = lw.contig(float_in(lw, node.args[0]))
    y = lw.new(x.shape, "f32")
    emit(lw, "gr_sigmoid_tr_f32", f"gr_sigmoid_tr_f32({x.ptr()}, {y.out()}, {x.numel});", [x], [y])
    return y


@train_handles(aten.sigmoid_backward.default, aten.hardsigmoid_backward.default)
def _gate_bwd(lw: TrainLowerer, node: fx.Node) -> Val:
    """Squeeze-excitation gates: sigmoid backward (from its output), hardsigmoid backward
    (from its input)."""
    g, v = float_in(lw, node.args[0]), float_in(lw, node.args[1])
    if g.shape != v.shape:
        raise Unsupported("a gate backward with broadcasting")
    gx = lw.new(g.shape, "f32", inplace_of=g)
    kernel = "gr_sigmoid_bwd_f32" if node.target == aten.sigmoid_backward.default else "gr_hardsigmoid_bwd_f32"
    emit(lw, kernel, f"{kernel}({g.ptr()}, {v.ptr()}, {gx.out()}, {g.numel});", [g, v], [gx])
    return gx


@train_handles(aten.convolution_backward.default)
def _conv_bwd(lw: TrainLowerer, node: fx.Node) -> tuple:
    """(grad_input, grad_weight, grad_bias) per output_mask; a partial-channel weight
    gradient arrives as the first k channels of grad_output with the first k filters."""
    a = node.args
    if a[7] or any(a[8] or ()):
        raise Unsupported("transposed convolution")
    c = {"stride": tuple(a[4]), "padding": tuple(a[5]), "dilation": tuple(a[6]), "groups": int(a[9])}
    mask = list(a[10])
    raw = lw.vals.get(a[0])
    if isinstance(raw, Val) and isinstance(raw.buf, MaskedBcast):  # a pooled gradient, not stored whole
        outs = s8.conv_bwd_bcast(lw, node, c, mask, raw)
        if outs is not None:
            return outs
    gy = float_in(lw, a[0])
    if s8.scaled_of(lw, a[2]) is not None or s8.dq_of(lw, a[1]) is not None:
        return s8.conv_bwd(lw, node, c, mask, gy)
    xs = tuple(val_meta(a[1]).shape)
    ws = tuple(val_meta(a[2]).shape)
    k = gy.shape[1]
    s, macs = conv_shape(xs, ws, gy.shape, c)
    outs: list[Val | None] = [None, None, None]
    if mask[0]:
        wv = lw.val(a[2])
        gx = lw.new(xs, "f32", name=node.name + "_gx")
        if isinstance(wv.buf, SplitBuf):
            _conv_bwd_input_split(lw, gy, wv.buf, gx, c)
        else:
            w = lw.contig(wv)
            emit(lw, "gr_conv2d_bwd_input_f32", f"{{ {s}\n  gr_conv2d_bwd_input_f32(&s, {gy.ptr()}, "
                 f"{w.ptr()}, {gx.out()}); }}", [gy, w], [gx], macs)
        outs[0] = gx
    if mask[1]:
        x = float_in(lw, a[1])
        gw = lw.new(ws, "f32", name=node.name + "_gw")
        emit(lw, "gr_conv2d_bwd_weight_f32", f"{{ {s}\n  gr_conv2d_bwd_weight_f32(&s, {k}, {gy.ptr()}, "
             f"{x.ptr()}, {gw.out()}); }}", [gy, x], [gw], macs)
        outs[1] = gw
    if mask[2]:
        gb = lw.new((k,), "f32", name=node.name + "_gb")
        emit(lw, "gr_conv2d_bwd_bias_f32", f"gr_conv2d_bwd_bias_f32({gy.shape[0]}, {k}, "
             f"{gy.shape[2] * gy.shape[3]}, {gy.ptr()}, {gb.out()});", [gy], [gb])
        outs[2] = gb
    return tuple(outs)


def _conv_bwd_input_split(lw: TrainLowerer, gy: Val, split: SplitBuf, gx: Val, c: dict) -> None:
    """Input gradient through a split weight: per image, the trained filters' part,
    then the frozen filters' part added (depthwise: each part owns its channels)."""
    n, cin, h, w_ = gx.shape
    oc, oh, ow = gy.shape[1:]
    dw = c["groups"] > 1
    code = []
    for j, (oc0, part, ic0, ic, groups) in enumerate(split_parts(split, c, cin)):
        k = part.shape[0]
        s, _ = conv_shape((1, ic, h, w_), part.shape, (1, k, oh, ow), {**c, "groups": groups})
        fn = "gr_conv2d_bwd_input_f32" if j == 0 or dw else "gr_conv2d_bwd_input_acc_f32"
        code.append(f"{{ {s}")
        for i in range(n):
            gyi = Val(gy.buf, (k, oh, ow), (oh * ow, ow, 1), gy.offset + (i * oc + oc0) * oh * ow)
            gxi = Val(gx.buf, (ic, h, w_), (h * w_, w_, 1), gx.offset + (i * cin + ic0) * h * w_)
            code.append(f"  {fn}(&s, {gyi.ptr()}, {part.ptr()}, {gxi.out()});")
        code.append("}")
    lw.emit("gr_conv2d_bwd_input_f32", TRAIN_FILE, "\n".join(code), [gy, split.trained, split.rest], [gx],
            op=op_name(lw.current) + " (split weight)")
    lw.kernel_files.add("gr_train.h")


@train_handles(aten.max_pool2d_with_indices.default)
def _max_pool_idx(lw: TrainLowerer, node: fx.Node) -> tuple:
    """Max pooling whose indices the backward reads: record them as torch does."""
    if all(u.args[1] == 0 for u in node.users):
        return HANDLERS[node.target](lw, node)
    a = list(node.args) + [None] * 6
    x = float_in(lw, a[0])
    if len(x.shape) != 4 or a[5]:
        raise Unsupported("only NCHW pooling without ceil_mode")
    k = pair(a[1])
    s = pair(a[2]) if a[2] else k
    p, d = pair(a[3] or 0), pair(a[4] or 1)
    ys = tuple(int(v) for v in node.meta["val"][0].shape)
    y, idx = lw.new(ys, "f32"), lw.new(ys, "i64", name=node.name + "_idx")
    emit(lw, "gr_max_pool2d_idx_f32", f"{{ {pool_shape(x, ys, k, s, p, d)}\n"
         f"  gr_max_pool2d_idx_f32(&s, {x.ptr()}, {y.out()}, {idx.out()}); }}", [x], [y, idx])
    return (y, idx)


@train_handles(aten.max_pool2d_with_indices_backward.default)
def _max_pool_bwd(lw: TrainLowerer, node: fx.Node) -> Val:
    g, idx = float_in(lw, node.args[0]), lw.contig(lw.val(node.args[7]))
    xs = tuple(val_meta(node.args[1]).shape)
    gx = lw.new(xs, "f32")
    emit(lw, "gr_max_pool2d_bwd_f32", f"gr_max_pool2d_bwd_f32({g.ptr()}, {idx.ptr()}, {gx.out()}, "
         f"{xs[0] * xs[1]}, {xs[2] * xs[3]}, {g.shape[2] * g.shape[3]});", [g, idx], [gx])
    return gx


@train_handles(aten.avg_pool2d_backward.default)
def _avg_pool_bwd(lw: TrainLowerer, node: fx.Node) -> Val:
    a = list(node.args) + [None] * 8
    g = float_in(lw, a[0])
    xs = tuple(val_meta(a[1]).shape)
    k = pair(a[2])
    s = pair(a[3]) if a[3] else k
    p = pair(a[4] or 0)
    if a[5]:
        raise Unsupported("average pooling with ceil_mode")
    cip, div = int(bool(a[6])), int(a[7] or 0)
    gx = lw.new(xs, "f32")
    emit(lw, "gr_avg_pool2d_bwd_f32", f"{{ {pool_shape(gx, g.shape, k, s, p, (1, 1), cip, div)}\n"
         f"  gr_avg_pool2d_bwd_f32(&s, {g.ptr()}, {gx.out()}); }}", [g], [gx])
    return gx


@train_handles(aten._adaptive_avg_pool2d_backward.default)
def _adaptive_avg_bwd(lw: TrainLowerer, node: fx.Node) -> Val:
    g = float_in(lw, node.args[0])
    xs = tuple(val_meta(node.args[1]).shape)
    gx = lw.new(xs, "f32")
    emit(lw, "gr_adaptive_avg_pool2d_bwd_f32", f"gr_adaptive_avg_pool2d_bwd_f32({g.ptr()}, {gx.out()}, "
         f"{xs[0] * xs[1]}, {xs[2]}, {xs[3]}, {g.shape[2]}, {g.shape[3]});", [g], [gx])
    return gx
