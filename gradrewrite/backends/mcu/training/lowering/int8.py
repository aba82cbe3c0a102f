"""int8 training-step lowering: the kernels of ``kernels/gr_train_s8.c`` for the
device form of an int8 step (``..device_form``).

Values the int8 backward reads without a float copy (``buffers.py``):

- ``DqBuf``: a dequantized int8 activation (``dequantize_per_tensor`` of an int8
  tensor). Int8-aware kernels read the int8 tensor with its scale and zero point (the
  saved activation stays int8 in the arena); any other reader gets a float copy made
  right before it (``TrainLowerer.val``), which lives only as long as that reader needs it.
- ``ScaledS8``: an int8 weight times its per-output-channel scales (``mul(w_q, s)``),
  read by the input-gradient kernels; the int8 array is the one the forward uses (SRAM
  when trained, flash when frozen, or both parts of a partially trained one).

This module also registers the handlers of the device form's own ops and of the int8
step's dequantize / weight-scale markers.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from .....rewrite.quant_ops import DEQUANTIZE_PER_TENSOR
from ...inference.lowering.base import HANDLERS, Unsupported, conv_shape, shape_of, val_meta
from ...program import Val, c_float, contiguous_strides
from .. import device_form as dev
from .base import TRAIN_HANDLERS, train_handles
from .buffers import DqBuf, ScaledS8
from .lowerer import TrainLowerer

aten = torch.ops.aten
S8_FILE = "gr_train_s8.c"


def dq_of(lw: TrainLowerer, node) -> DqBuf | None:
    v = lw.vals.get(node) if isinstance(node, fx.Node) else None
    return v.buf if isinstance(v, Val) and isinstance(v.buf, DqBuf) else None


def q_view(lw: TrainLowerer, node) -> Val:
    """The int8 tensor behind a (view of a) dequantized activation, with the same view."""
    v = lw.vals[node]
    d = v.buf
    if not d.q.is_contiguous():
        raise Unsupported("a strided int8 activation")
    return lw.contig(Val(d.q.buf, v.shape, v.strides, d.q.offset + v.offset))  # e.g. a batch's first channels


def scaled_of(lw: TrainLowerer, node) -> ScaledS8 | None:
    """The int8 weight behind ``mul(w_q, s)``; a frozen one is a constant the lowering
    never visits, so it is found by its pattern."""
    v = lw.vals.get(node) if isinstance(node, fx.Node) else None
    if isinstance(v, Val) and isinstance(v.buf, ScaledS8):
        return v.buf
    sw = dev.scaled_weight(node)
    return lw._scaled.get(str(sw[0].target)) if sw is not None else None


def _emit(lw: TrainLowerer, kernel: str, code: str, reads: list[Val], writes: list[Val], macs: int = 0,
          op: str | None = None) -> None:
    lw.emit(kernel, S8_FILE, code, reads, writes, macs, op=op)
    lw.kernel_files.add("gr_train.h")
    lw.kernel_files.add("gr_train.c")


def dequantize_marker(lw: TrainLowerer, node: fx.Node) -> Val:
    q = lw.contig(lw.val(node.args[0]))
    if q.dtype != "i8":
        raise Unsupported("only int8 dequantize")
    shape = tuple(q.shape)
    buf = DqBuf(lw._unique(node.name), "dq", q.nbytes * 4, "f32", q=q, scale=float(node.args[1]),
                zp=int(node.args[2]))
    return Val(buf, shape, contiguous_strides(shape))


def ste(lw: TrainLowerer, node: fx.Node) -> Val:
    g, q = lw.contig(lw.val(node.args[0])), lw.contig(lw.val(node.args[1]))
    if q.dtype != "i8" or g.dtype != "f32" or g.numel != q.numel:
        raise Unsupported("straight-through mask of a non-int8 value")
    gx = lw.new(g.shape, "f32", inplace_of=g)
    _emit(lw, "gr_ste_s8_f32", f"gr_ste_s8_f32({g.ptr()}, {q.ptr()}, {int(node.args[2])}, {int(node.args[3])}, "
          f"{gx.out()}, {g.numel});", [g, q], [gx])
    return gx


def mask_bits(lw: TrainLowerer, node: fx.Node) -> Val:
    q = lw.contig(lw.val(node.args[0]))
    if q.dtype != "i8":
        raise Unsupported("a gradient mask of a non-int8 value")
    qmin, qmax, scale, zp, lo, hi = node.args[1:7]
    bits = lw.new(((q.numel + 7) // 8,), "u8", name=node.name)
    _emit(lw, "gr_mask_bits_s8", f"gr_mask_bits_s8({q.ptr()}, {q.numel}, {int(qmin)}, {int(qmax)}, "
          f"{c_float(scale)}, {int(zp)}, {c_float(lo)}, {c_float(hi)}, {bits.out()});", [q], [bits])
    return Val(bits.buf, tuple(q.shape), contiguous_strides(tuple(q.shape)))  # one bit per element of q


def masked_grad(lw: TrainLowerer, node: fx.Node) -> Val:
    g = lw.contig(lw.val(node.args[0]))
    bits = lw.vals[node.args[1]]
    if g.numel != bits.numel:
        raise Unsupported("a gradient mask of another shape")
    gx = lw.new(g.shape, "f32", inplace_of=g)
    _emit(lw, "gr_masked_grad_f32", f"gr_masked_grad_f32({g.ptr()}, {Val(bits.buf, (1,), (1,)).ptr()}, {g.numel}, "
          f"{gx.out()});", [g, Val(bits.buf, (1,), (1,))], [gx])
    return gx


def act_bwd(lw: TrainLowerer, node: fx.Node, d: DqBuf) -> Val:
    g = lw.contig(lw.val(node.args[0]))
    gx = lw.new(g.shape, "f32", inplace_of=g)
    if node.target == aten.threshold_backward.default:
        _emit(lw, "gr_threshold_bwd_s8_f32", f"gr_threshold_bwd_s8_f32({g.ptr()}, {d.q.ptr()}, {c_float(d.scale)}, "
              f"{d.zp}, {c_float(float(node.args[2]))}, {gx.out()}, {g.numel});", [g, d.q], [gx])
    else:
        _emit(lw, "gr_hardtanh_bwd_s8_f32", f"gr_hardtanh_bwd_s8_f32({g.ptr()}, {d.q.ptr()}, {c_float(d.scale)}, "
              f"{d.zp}, {c_float(float(node.args[2]))}, {c_float(float(node.args[3]))}, {gx.out()}, {g.numel});",
              [g, d.q], [gx])
    return gx


def conv_bwd(lw: TrainLowerer, node: fx.Node, c: dict, mask: list, gy: Val) -> tuple:
    """convolution_backward with an int8 weight and/or int8 saved input."""
    a = node.args
    xs, ws = tuple(val_meta(a[1]).shape), tuple(val_meta(a[2]).shape)
    k = gy.shape[1]
    s, macs = conv_shape(xs, ws, (gy.shape[0], ws[0], *gy.shape[2:]), c)
    outs: list = [None, None, None]
    if mask[0]:
        w = scaled_of(lw, a[2])
        if w is None or k != ws[0]:
            raise Unsupported("int8 conv input gradient needs the int8 weight and every output channel")
        gx = lw.new(xs, "f32", name=node.name + "_gx")
        code = [f"{{ {s}"]
        reads = [gy]
        for j, (o0, part) in enumerate(w.parts):
            o1 = o0 + part.shape[0]
            code.append(f"  gr_conv2d_bwd_input_ws8_f32(&s, {gy.ptr()}, {part.ptr()}, {w.scale.name}, {o0}, {o1}, "
                        f"{int(j > 0)}, {gx.out()});")
            reads.append(part)
        code.append("}")
        _emit(lw, "gr_conv2d_bwd_input_ws8_f32", "\n".join(code), reads, [gx], macs)
        outs[0] = gx
    if mask[1]:
        d = dq_of(lw, a[1])
        gw = lw.new((k, *ws[1:]), "f32", name=node.name + "_gw")
        if d is None:
            raise Unsupported("int8 conv weight gradient of a float input")
        xq = q_view(lw, a[1])
        _emit(lw, "gr_conv2d_bwd_weight_xs8_f32", f"{{ {s}\n  gr_conv2d_bwd_weight_xs8_f32(&s, {k}, {gy.ptr()}, "
              f"{xq.ptr()}, {c_float(d.scale)}, {d.zp}, {gw.out()}); }}", [gy, xq], [gw], macs * k // ws[0])
        outs[1] = gw
    if mask[2]:
        gb = lw.new((k,), "f32", name=node.name + "_gb")
        lw.emit("gr_conv2d_bwd_bias_f32", "gr_train.c", f"gr_conv2d_bwd_bias_f32({gy.shape[0]}, {k}, "
                f"{gy.shape[2] * gy.shape[3]}, {gy.ptr()}, {gb.out()});", [gy], [gb])
        outs[2] = gb
    return tuple(outs)


def linear_bwd_input(lw: TrainLowerer, node: fx.Node) -> Val:
    g = lw.contig(lw.val(node.args[0]))
    w = scaled_of(lw, node.args[1])
    if w is None:
        raise Unsupported("linear input gradient through a weight that is not int8")
    rows, nout = g.shape
    kin = w.parts[0][1].shape[1]
    gx = lw.new(shape_of(node), "f32")
    code, reads = [], [g]
    for j, (o0, part) in enumerate(w.parts):
        code.append(f"gr_linear_bwd_input_ws8_f32({g.ptr()}, {part.ptr()}, {w.scale.name}, {o0}, "
                    f"{o0 + part.shape[0]}, {int(j > 0)}, {gx.out()}, {rows}, {kin}, {nout});")
        reads.append(part)
    _emit(lw, "gr_linear_bwd_input_ws8_f32", "\n".join(code), reads, [gx], rows * kin * nout)
    return gx


def linear_bwd_weight(lw: TrainLowerer, node: fx.Node) -> Val:
    g = lw.val(node.args[0])
    d = dq_of(lw, node.args[1])
    if d is None:
        raise Unsupported("linear weight gradient of a float input")
    rows, k = g.shape
    if g.is_contiguous():
        nout = k
    elif g.strides[1] == 1 and g.strides[0] >= k:  # the first k columns (a partial-channel update)
        nout = g.strides[0]
    else:
        g = lw.contig(g)
        nout = k
    xq = q_view(lw, node.args[1])
    kin = xq.shape[-1]
    gw = lw.new((k, kin), "f32")
    _emit(lw, "gr_linear_bwd_weight_xs8_f32", f"gr_linear_bwd_weight_xs8_f32({g.ptr()}, {xq.ptr()}, "
          f"{c_float(d.scale)}, {d.zp}, {gw.out()}, {rows}, {kin}, {nout}, {k});", [g, xq], [gw], rows * kin * k)
    return gw


def sgd_int(lw: TrainLowerer, w: Val, g: Val, factor: np.ndarray, dtype: str, rows: int, bound: int) -> None:
    """The integer update of an int8 weight / int32 bias (gr_sgd_s8 / gr_sgd_s32), saturated at ±bound."""
    f = lw.add_const((w.buf.name + "_qas"), factor.astype(np.float32), "f32")
    cols = w.numel // rows
    rng = "&gr_rng_state" if lw.rounding == "stochastic" else "NULL"
    if dtype == "i8":
        _emit(lw, "gr_sgd_s8", f"gr_sgd_s8({w.out()}, {g.ptr()}, {f.name}, lr, {rows}, {cols}, -{bound}, {bound}, "
              f"{rng});", [w, g], [w])
    else:
        _emit(lw, "gr_sgd_s32", f"gr_sgd_s32({w.out()}, {g.ptr()}, {f.name}, lr, {rows}, {cols}, {bound}, {rng});",
              [w, g], [w])


@train_handles(DEQUANTIZE_PER_TENSOR)
def _dq(lw: TrainLowerer, node: fx.Node) -> Val:
    if not lw.int8:
        return HANDLERS[node.target](lw, node)
    if node.args[0] in lw.vals and lw.vals[node.args[0]] is None:
        return None  # a streamed expand's output, never stored: only shapes are read (TrainLowerer._reads_shape_only)
    return dequantize_marker(lw, node)


@train_handles(aten.mul.Tensor)
def _mul(lw: TrainLowerer, node: fx.Node) -> Val:
    a = node.args[0]
    if lw.int8 and isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target) in lw._scaled:
        buf = lw._scaled[str(a.target)]
        shape = shape_of(node)
        return Val(buf, shape, contiguous_strides(shape))
    return HANDLERS[node.target](lw, node)


# the device form's own ops (..device_form)
TRAIN_HANDLERS.update({dev.ste_s8: ste, dev.mask_bits: mask_bits, dev.masked_grad: masked_grad,
                       dev.linear_bwd_input: linear_bwd_input, dev.linear_bwd_weight: linear_bwd_weight})


@train_handles(dev.pad_s8)
def _pad_s8(lw: TrainLowerer, node: fx.Node) -> Val:
    """An int8 activation padded with its zero point (the device form of a zero pad)."""
    x = lw.contig(lw.val(node.args[0]))
    w = list(node.args[1]) + [0] * 4
    if x.dtype != "i8" or len(x.shape) < 2 or any(w[4:]):
        raise Unsupported("an int8 pad of dims other than the last two")
    left, right, top, bottom = (int(v) for v in w[:4])
    y = lw.new(shape_of(node), "i8")
    lw.emit("gr_pad_s8", "gr_int8_elementwise.c",
            f"gr_pad_s8({x.ptr()}, {y.out()}, {int(np.prod(x.shape[:-2]))}, {x.shape[-2]}, {x.shape[-1]}, {top}, "
            f"{bottom}, {left}, {right}, {int(node.args[2])}, NULL);", [x], [y])
    return y
