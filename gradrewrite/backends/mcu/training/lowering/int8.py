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

import math
import operator

import numpy as np
import torch
import torch.fx as fx

from .....rewrite.graph import op_name
from .....rewrite.quant_ops import DEQUANTIZE_PER_TENSOR
from ...inference.lowering.base import HANDLERS, Unsupported, conv_shape, shape_of, val_meta
from ...program import Val, c_float, contiguous_strides
from .. import device_form as dev
from . import float_head
from .base import TRAIN_HANDLERS, train_handles
from .buffers import DqBuf, MaskedBcast, ScaledS8
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
    rest = f"{int(qmin)}, {int(qmax)}, {c_float(scale)}, {int(zp)}, {c_float(lo)}, {c_float(hi)}"
    _emit(lw, "gr_mask_bits_s8", f"gr_mask_bits_s8({q.ptr()}, {q.numel}, {rest}, {bits.out()});", [q], [bits])
    lw._mask_steps[id(lw.steps[-1])] = (rest, bits)
    return Val(bits.buf, tuple(q.shape), contiguous_strides(tuple(q.shape)))  # one bit per element of q


def masked_grad(lw: TrainLowerer, node: fx.Node) -> Val:
    bits = lw.vals[node.args[1]]
    raw = lw.val(node.args[0])
    if lw.bcast_grads and _is_plane_bcast(raw) and raw.numel == bits.numel \
            and all(u.target == aten.convolution_backward.default and u.args[0] is node for u in node.users):
        # stored by no one: the conv backward reads it in channel chunks (conv_bwd_bcast)
        d = Val(raw.buf, raw.shape[:2], raw.strides[:2], raw.offset)
        return Val(MaskedBcast(lw._unique(node.name), "lazy", raw.numel * 4, "f32", d=d, bits=bits), raw.shape,
                   contiguous_strides(raw.shape))
    g = lw.contig(raw)
    if g.numel != bits.numel:
        raise Unsupported("a gradient mask of another shape")
    gx = lw.new(g.shape, "f32", inplace_of=g)
    _emit(lw, "gr_masked_grad_f32", f"gr_masked_grad_f32({g.ptr()}, {Val(bits.buf, (1,), (1,)).ptr()}, {g.numel}, "
          f"{gx.out()});", [g, Val(bits.buf, (1,), (1,))], [gx])
    return gx


def _is_plane_bcast(v: Val) -> bool:
    """An [n, C, H, W] float view with every plane one value (stride 0 over H and W)."""
    return (v.dtype == "f32" and len(v.shape) == 4 and v.shape[2] * v.shape[3] > 1 and v.strides[2:] == (0, 0)
            and v.buf.kind == "arena")


BCAST_CHUNK_BYTES = 4096   # the scratch a MaskedBcast gradient is made in, per chunk of channels


def conv_bwd_bcast(lw: TrainLowerer, node: fx.Node, c: dict, mask: list, gy: Val) -> tuple | None:
    """The input and bias gradients of a conv whose output gradient is a ``MaskedBcast``
    (a pooled gradient broadcast and masked, never stored whole): per chunk of output
    channels, the chunk of gy is made in a scratch buffer (``gr_bcast_masked_f32``), its
    input-gradient terms are added to gx and its bias gradients summed. Every gx element
    gets its terms in output-channel order, every bias its terms in (image, pixel) order,
    as the whole-tensor kernels add them: the same bits. None (not handled) for a weight
    gradient, a grouped conv or a split weight."""
    m: MaskedBcast = gy.buf
    a = node.args
    w = scaled_of(lw, a[2])
    xs, ws = tuple(val_meta(a[1]).shape), tuple(val_meta(a[2]).shape)
    n, oc, oh, ow = gy.shape
    if mask[1] or c["groups"] != 1 or w is None or len(w.parts) != 1 or oc != ws[0]:
        return None
    hw = oh * ow
    k = max([d for d in range(1, oc + 1) if oc % d == 0 and d * n * hw * 4 <= BCAST_CHUNK_BYTES] or [1])
    scratch = lw.new((n, k, oh, ow), "f32", name=m.name + "_chunk")
    part = w.parts[0][1]
    per = int(np.prod(ws[1:]))
    s, macs = conv_shape(xs, (k, *ws[1:]), (n, k, oh, ow), c)
    outs: list = [None, None, None]
    writes = [scratch]
    code = [f"{{ {s if mask[0] else ''}", f"  for (int32_t c0 = 0; c0 < {oc}; c0 += {k}) {{",
            f"    gr_bcast_masked_f32({m.d.ptr()}, {m.d.strides[0]}, {m.d.strides[1]}, "
            f"{Val(m.bits.buf, (1,), (1,)).ptr()}, {n}, {oc}, {hw}, c0, c0 + {k}, {scratch.out()});"]
    if mask[0]:
        gx = lw.new(xs, "f32", name=node.name + "_gx")
        code.append(f"    gr_conv2d_bwd_input_ws8_f32(&s, {scratch.ptr()}, {part.ptr()} + (size_t)c0 * {per}, "
                    f"{w.scale.name} + c0, 0, {k}, c0 > 0, {gx.out()});")
        writes.append(gx)
        outs[0] = gx
    if mask[2]:
        gb = lw.new((oc,), "f32", name=node.name + "_gb")
        code.append(f"    gr_conv2d_bwd_bias_f32({n}, {k}, {hw}, {scratch.ptr()}, {gb.out()} + c0);")
        writes.append(gb)
        outs[2] = gb
    code += ["  }", "}"]
    _emit(lw, "gr_conv2d_bwd_input_ws8_f32", "\n".join(code), [m.d, m.bits, part], writes,
          macs * oc // k if mask[0] else 0, op=op_name(node) + " (masked broadcast gradient, in channel chunks)")
    return tuple(outs)


def _only_user(node: fx.Node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _items(node: fx.Node) -> dict[int, fx.Node]:
    """getitem index -> node, for a tuple-valued node read only through getitems."""
    if any(u.target is not operator.getitem for u in node.users):
        return {-1: node}
    return {int(u.args[1]): u for u in node.users}


def _pointwise(c: dict, ws) -> bool:
    return (c["groups"] == 1 and tuple(ws[2:]) == (1, 1) and c["stride"] == (1, 1) and c["padding"] == (0, 0)
            and c["dilation"] == (1, 1))


def _conv_params(node: fx.Node) -> dict:
    a = node.args
    return {"stride": tuple(a[4]), "padding": tuple(a[5]), "dilation": tuple(a[6]), "groups": int(a[9])}


def ir_bwd(lw: TrainLowerer, node: fx.Node, c: dict, mask: list, gy: Val) -> tuple | None:
    """The backward of an inverted residual block (pointwise project <- depthwise <-
    pointwise expand, frozen int8 weights, relu6-style masks between) in one step,
    ``gr_ir_bwd_s8_f32``, one expanded channel at a time: neither expanded gradient is
    stored. ``node`` is the project conv's backward; the depthwise and expand convs'
    backward nodes (and the masks and items between) are marked computed (``_bwd_fused``).
    Their bias gradients are made here, their updates stay where the graph has them (the
    rounding draws keep their order). A partially trained project or expand weight (its
    first rows trained: two parts) is read part by part; the expand's weight gradient (a
    ``slice`` of its first channels of the masked expanded gradient, the one other reader of
    that gradient) gets those channels, copied out by the kernel: only they are stored, and
    its update (and the project's, which reads the stored gy) stays in its place. None when
    the chain is not exactly that."""
    if not lw.ir_bwd or mask[1] or not mask[0]:
        return None
    chain = []
    cur, cmask = node, mask
    for kind in ("project", "dw", "expand"):
        a = cur.args
        w = scaled_of(lw, a[2])
        ws = tuple(val_meta(a[2]).shape)
        cp = _conv_params(cur)
        if w is None or len(w.parts) > (1 if kind == "dw" else 2) or cmask[1] or a[7] or any(a[8] or ()):
            return None
        if kind != "dw" and not _pointwise(cp, ws):
            return None
        if kind == "dw" and not (cp["groups"] == ws[0] > 1 and ws[1] == 1):
            return None
        items = _items(cur)
        if -1 in items or set(items) - {0, 2} or (1 in items):
            return None
        chain.append((cur, w, ws, cp, cmask, items))
        if kind == "expand":
            break
        if not cmask[0] or 0 not in items:
            return None
        m = _only_user(items[0])
        if m is None or m.target is not dev.masked_grad or m.args[0] is not items[0]:
            return None
        convs = [u for u in m.users if u.target == aten.convolution_backward.default and u.args[0] is m]
        rest = [u for u in m.users if u not in convs]
        if len(convs) != 1 or len(rest) > (1 if kind == "dw" else 0):
            return None
        if rest and _lead_channels(rest[0], m) is None:
            return None
        nxt = convs[0]
        chain[-1] = (*chain[-1], m, rest[0] if rest else None)
        cur, cmask = nxt, list(nxt.args[10])
    (pn, pw_, pws, pc, pmask, pitems, m1, _), (dn, dw_, dws, dc, dmask, ditems, m2, sl) = chain[:2]
    en, ew, ews, ec, emask, eitems = chain[2]
    n, cout, h, w = gy.shape
    ch = pws[1]
    xd, xe = tuple(val_meta(dn.args[1]).shape), tuple(val_meta(en.args[1]).shape)
    if dws[0] != ch or ews[0] != ch or xd[1] != ch or tuple(val_meta(pn.args[1]).shape) != (n, ch, h, w):
        return None
    bits1, bits2 = lw.vals.get(m1.args[1]), lw.vals.get(m2.args[1])
    if not (isinstance(bits1, Val) and isinstance(bits2, Val) and bits1.numel == n * ch * h * w
            and bits2.numel == math.prod(xd)):
        return None
    # the project conv's bias gradient reads gy, as unfused
    outs: list = [None, None, None]
    sp, pmacs = conv_shape((n, ch, h, w), pws, (n, cout, h, w), pc)
    _w_and_b(lw, pn, pn.args, sp, pmacs, pmask, gy, cout, pws, outs)
    sd, dmacs = conv_shape(xd, dws, (n, ch, h, w), dc)
    se, emacs = conv_shape(xe, ews, (n, ch, *xd[2:]), ec)
    gbd = lw.new((ch,), "f32", name=dn.name + "_gb") if dmask[2] and 2 in ditems else None
    gbe = lw.new((ch,), "f32", name=en.name + "_gb") if emask[2] and 2 in eitems else None
    gx = lw.new(xe, "f32", name=en.name + "_gx") if emask[0] and 0 in eitems else None
    k3 = _lead_channels(sl, m2) if sl is not None else 0
    g3 = lw.new((n, k3, *xd[2:]), "f32", name=sl.name) if k3 else None
    t1 = lw.new((h, w), "f32", name=pn.name + "_plane")
    t2 = lw.new(xd[2:], "f32", name=dn.name + "_plane")
    flat = [Val(b.buf, (1,), (1,), b.offset) for b in (bits1, bits2)]
    ptr = lambda v: v.out() if v is not None else "NULL"  # noqa: E731

    def parts(w, rows: int) -> tuple[str, str, int]:  # first part, second part (or NULL), rows of the first
        p = w.parts
        return p[0][1].ptr(), (p[1][1].ptr() if len(p) > 1 else "NULL"), (p[1][0] if len(p) > 1 else rows)

    wp1, wp2, rp = parts(pw_, cout)
    we1, we2, re_ = parts(ew, ch)
    code = "\n".join([
        "{ " + sp.replace(" s = ", " sp = "), "  " + sd.replace(" s = ", " sd = "),
        "  " + se.replace(" s = ", " se = "),
        f"  gr_ir_bwd_s8_f32(&sp, {gy.ptr()}, {wp1}, {wp2}, {rp}, {pw_.scale.name}, {flat[0].ptr()},",
        f"      &sd, {dw_.parts[0][1].ptr()}, {dw_.scale.name}, {ptr(gbd)}, {flat[1].ptr()},",
        f"      &se, {we1}, {we2}, {re_}, {ew.scale.name}, {ptr(gbe)}, {ptr(gx)}, {ptr(g3)}, {k3},",
        f"      {t1.out()}, {t2.out()}); }}"])
    writes = [v for v in (gbd, gbe, gx, g3) if v is not None] + [t1, t2]
    reads = [gy, *(p[1] for p in pw_.parts), *flat, dw_.parts[0][1], *(p[1] for p in ew.parts)]
    _emit(lw, "gr_ir_bwd_s8_f32", code, reads, writes, pmacs + dmacs + (emacs if gx is not None else 0),
          op=op_name(pn) + " (inverted residual block backward, one expanded channel at a time)")
    lw._bwd_fused.update({pitems[0]: None, m1: None, dn: (None, None, gbd), ditems[0]: None, m2: None,
                          en: (gx, None, gbe)})
    if g3 is not None:  # the expand's weight gradient reads these channels, as stored here
        lw._bwd_fused[sl] = g3
    return tuple(outs)


def _lead_channels(node: fx.Node, of: fx.Node) -> int | None:
    """k when ``node`` is ``of[:, :k]`` (a slice of its first k channels, k < all), else None."""
    if node.target != aten.slice.Tensor or node.args[0] is not of or node.kwargs:
        return None
    dim, start, end, step = (*node.args[1:], *(0, None, None, 1)[len(node.args) - 1:])[:4]  # slice's defaults
    shape = tuple(val_meta(of).shape)
    if len(shape) != 4 or int(dim) % 4 != 1 or (start or 0) != 0 or (step or 1) != 1 or end is None:
        return None
    k = min(int(end), shape[1])
    return k if 0 < k < shape[1] else None


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
    fused = ir_bwd(lw, node, c, mask, gy)
    if fused is not None:
        return fused
    outs: list = [None, None, None]
    inplace = (mask[0] and lw.inplace_dw_bwd and c["groups"] == xs[1] == ws[0] > 1 and ws[1] == 1
               and tuple(gy.shape) == tuple(xs) and gy.is_contiguous() and gy.offset == 0
               and len(getattr(scaled_of(lw, a[2]), "parts", ())) == 1)
    if inplace:  # the weight and bias gradients read gy first: the input gradient may overwrite it
        _w_and_b(lw, node, a, s, macs, mask, gy, k, ws, outs)
        w = scaled_of(lw, a[2])
        gx = lw.new(xs, "f32", name=node.name + "_gx", inplace_of=gy)
        plane = lw.new((xs[2], xs[3]), "f32", name=node.name + "_gx_plane")
        part = w.parts[0][1]
        _emit(lw, "gr_dw_bwd_input_ws8_f32", f"{{ {s}\n  gr_dw_bwd_input_ws8_f32(&s, {gy.ptr()}, {part.ptr()}, "
              f"{w.scale.name}, {gx.out()}, {plane.out()}); }}", [gy, part], [gx, plane], macs,
              op=op_name(node) + " (depthwise, over its output gradient)")
        outs[0] = gx
        return tuple(outs)
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
    _w_and_b(lw, node, a, s, macs, mask, gy, k, ws, outs)
    return tuple(outs)


def _w_and_b(lw: TrainLowerer, node: fx.Node, a, s: str, macs: int, mask: list, gy: Val, k: int, ws, outs: list):
    """conv_bwd's weight and bias gradients (into ``outs``)."""
    if mask[1]:
        d = dq_of(lw, a[1])
        gw = lw.new((k, *ws[1:]), "f32", name=node.name + "_gw")
        if d is None:
            raise Unsupported("int8 conv weight gradient of a float input")
        xq = q_view(lw, a[1])
        _emit(lw, "gr_conv2d_bwd_weight_xs8_f32", f"{{ {s}\n  gr_conv2d_bwd_weight_xs8_f32(&s, {k}, {gy.ptr()}, "
              f"{xq.ptr()}, {c_float(d.scale)}, {d.zp}, {gw.out()}); }}", [gy, xq], [gw], macs * k // ws[0])
        if gy.shape[0] == 1 and int(a[9]) == 1:  # one image, ungrouped: a row is the kernel's k = 1 call
            per = int(np.prod(ws[1:]))
            lw._wgrad[id(gw.buf)] = (lw.steps[-1], [gy, xq], per, lambda o, row: (
                f"{{ {s}\n  gr_conv2d_bwd_weight_xs8_f32(&s, 1, {gy.ptr()} + (size_t)({o}) * "
                f"{gy.shape[2] * gy.shape[3]}, {xq.ptr()}, {c_float(d.scale)}, {d.zp}, {row}); }}"))
        outs[1] = gw
    if mask[2]:
        gb = lw.new((k,), "f32", name=node.name + "_gb")
        lw.emit("gr_conv2d_bwd_bias_f32", "gr_train.c", f"gr_conv2d_bwd_bias_f32({gy.shape[0]}, {k}, "
                f"{gy.shape[2] * gy.shape[3]}, {gy.ptr()}, {gb.out()});", [gy], [gb])
        outs[2] = gb


def linear_bwd_input(lw: TrainLowerer, node: fx.Node) -> Val:
    g = lw.contig(lw.val(node.args[0]))
    w = scaled_of(lw, node.args[1])
    if w is None and float_head.is_head_weight(lw, node.args[1]):
        return float_head.bwd_input(lw, node)
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
    if d is None and float_head.is_head_grad(lw, node):
        return float_head.bwd_weight(lw, node)
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
    lw._wgrad[id(gw.buf)] = (lw.steps[-1], [g, xq], kin, lambda o, row: (
        f"gr_linear_bwd_weight_xs8_f32({g.ptr()} + ({o}), {xq.ptr()}, {c_float(d.scale)}, {d.zp}, {row}, {rows}, "
        f"{kin}, {nout}, 1);"))
    return gw


def sgd_int(lw: TrainLowerer, w: Val, g: Val, factor: np.ndarray, dtype: str, rows: int, bound: int,
            g_only_here: bool = False) -> None:
    """The integer update of an int8 weight / int32 bias (gr_sgd_s8 / gr_sgd_s32), saturated at ±bound.
    ``g_only_here``: the update is the gradient's only reader (then it may be made row by row here)."""
    f = lw.add_const((w.buf.name + "_qas"), factor.astype(np.float32), "f32")
    cols = w.numel // rows
    rng = "&gr_rng_state" if lw.rounding == "stochastic" else "NULL"
    fused = lw._wgrad.get(id(g.buf)) if lw.fused_update and g_only_here and dtype == "i8" and g.offset == 0 \
        else None
    if fused is not None and fused[2] == cols and fused[0] in lw.steps \
            and not any(g.buf in st.reads for st in lw.steps[lw.steps.index(fused[0]) + 1:]):
        # the weight gradient is made a row at a time, here, and each row applied at once: no whole
        # gradient is stored. The same rows, in the same order, from the same (still live) inputs;
        # the update draws its rounding offsets at the update's place in the step, as unfused
        step, reads, _, row_code = fused
        lw.steps.remove(step)
        row = lw.new((cols,), "f32", name=g.buf.name + "_row")
        code = [f"for (int32_t o = 0; o < {rows}; o++) {{",
                *("  " + line for line in row_code("o", row.out()).splitlines()),
                f"  gr_sgd_s8({w.out()} + (size_t)o * {cols}, {row.ptr()}, {f.name} + o, lr, 1, {cols}, -{bound}, "
                f"{bound}, {rng});", "}"]
        lw.emit("gr_sgd_s8", S8_FILE, "\n".join(code), [*reads, w], [w, row], step.macs,
                op=op_name(lw.current) + " (weight gradient row by row, fused update)")
        return
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


@train_handles(aten.mean.dim, aten.sum.dim_IntList)
def _reduce(lw: TrainLowerer, node: fx.Node) -> Val:
    """A mean / sum of a dequantized int8 activation (the global average pool before the
    classifier) reads the int8 tensor: ``gr_reduce_s8_f32`` dequantizes each element as
    ``gr_dequantize_i8_f32`` does and sums as ``gr_reduce_f32`` does, so the result is the
    float copy's bit for bit without storing the copy (four times the int8 tensor)."""
    d = dq_of(lw, node.args[0])
    if not lw.int8_reduce or d is None or node.kwargs.get("dtype") is not None:
        return HANDLERS[node.target](lw, node)
    lw._raw_views = True
    try:
        x = lw.val(node.args[0])
    finally:
        lw._raw_views = False
    if not x.is_contiguous() or x.buf is not d:
        return HANDLERS[node.target](lw, node)
    dims = sorted(int(v) % len(x.shape) for v in (node.args[1] or range(len(x.shape))))
    if dims != list(range(dims[0], dims[-1] + 1)):
        return HANDLERS[node.target](lw, node)
    outer = int(np.prod(x.shape[:dims[0]], dtype=np.int64))
    red = int(np.prod(x.shape[dims[0]:dims[-1] + 1], dtype=np.int64))
    inner = int(np.prod(x.shape[dims[-1] + 1:], dtype=np.int64))
    q = Val(d.q.buf, x.shape, x.strides, d.q.offset + x.offset)
    y = lw.new(shape_of(node), "f32")
    if pool_chunks(lw, node, d, q, dims, y):
        return y
    _emit(lw, "gr_reduce_s8_f32", f"gr_reduce_s8_f32({q.ptr()}, {c_float(d.scale)}, {d.zp}, {y.out()}, {outer}, "
          f"{red}, {inner}, {int(node.target == aten.mean.dim)});", [q], [y])
    return y


POOL_CHUNK_BYTES = 2048   # the int8 scratch a chunk of the pooled conv's output channels is made in


def pool_chunks(lw: TrainLowerer, node: fx.Node, d: DqBuf, q: Val, dims: list[int], y: Val) -> bool:
    """The mean over the plane of a conv's int8 output that nothing else reads but its
    gradient masks (the global average pool after the last conv): the conv's step (emitted
    last but for those masks) is taken back and the conv, its masks and the mean are made
    one chunk of output channels at a time in a scratch buffer, the whole output never
    stored. Each output channel is the same integers (the chunk's rows of the weight, bias
    and requantization), each mask bit the same (chunks of whole bytes), each mean the same
    float sum: bit for bit the unchunked steps. False (nothing emitted) when not that case."""
    rec = lw._qconv.get(id(d.q.buf))
    dq_node = node.args[0]
    if not lw.chunked_pool or rec is None or rec[0] not in lw.steps or dims != [2, 3] or len(q.shape) != 4 \
            or q.shape[0] != 1 or q.offset != 0 or q.numel != d.q.numel or not isinstance(dq_node, fx.Node) \
            or dq_node.target != DEQUANTIZE_PER_TENSOR or list(dq_node.users) != [node]:
        return False
    conv_step, x, per = rec   # per: one output channel's weights
    later = lw.steps[lw.steps.index(conv_step) + 1:]
    if not all(id(st) in lw._mask_steps and st.reads == [d.q.buf] for st in later):
        return False
    qnode = dq_node.args[0]
    if not isinstance(qnode, fx.Node) or any(u is not dq_node and u.target is not dev.mask_bits
                                             for u in qnode.users):
        return False
    if sum(u.target is dev.mask_bits for u in qnode.users) != len(later):
        return False
    _, c, h, w = q.shape
    hw = h * w
    k = max([j for j in range(1, c + 1) if c % j == 0 and j * hw <= POOL_CHUNK_BYTES and j * hw % 8 == 0] or [0])
    head, sep, call = conv_step.code.partition("\n  gr_conv2d_s8(&s, &q, ")
    args = call.removesuffix("); }").split(", ")
    if not k or not sep or not head.startswith("{ ") or len(args) != 4 or args[0] != x.ptr() \
            or args[3] != d.q.out() or conv_step.writes != [d.q.buf]:
        return False
    scratch = lw.new((k, h, w), "i8", name=node.name + "_chunk")
    code = [head, f"  for (int32_t c0 = 0; c0 < {c}; c0 += {k}) {{",
            "    gr_conv_shape sc = s; gr_quant_params qc = q;",
            f"    sc.oc = {k}; qc.mult += c0; qc.shift += c0;",
            f"    gr_conv2d_s8(&sc, &qc, {x.ptr()}, {args[1]} + (size_t)c0 * {per}, {args[2]} + c0, {scratch.out()});"]
    writes = [scratch]
    for st in later:
        rest, bits = lw._mask_steps[id(st)]
        code.append(f"    gr_mask_bits_s8({scratch.ptr()}, {k * hw}, {rest}, {bits.out()} + (size_t)c0 * {hw} / 8);")
        writes.append(bits)
    code += [f"    gr_reduce_s8_f32({scratch.ptr()}, {c_float(d.scale)}, {d.zp}, {y.out()} + c0, {k}, {hw}, 1, "
             f"{int(node.target == aten.mean.dim)});", "  }", "}"]
    for st in [conv_step, *later]:
        lw.steps.remove(st)
    _emit(lw, "gr_conv2d_s8", "\n".join(code), [x], [*writes, y], conv_step.macs,
          op=f"{conv_step.op} + its masks + {op_name(node)}, per chunk of output channels")
    lw.kernel_files.add("gr_int8.c")
    return True


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
