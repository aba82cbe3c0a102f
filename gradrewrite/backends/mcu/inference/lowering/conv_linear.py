"""Multiply-accumulate ops: 2-D convolution, linear / addmm, (batched) matmul and
scaled dot-product attention. conv and linear leave their step fusable: a following
relu/relu6/hardtanh clamps their output as it is written (``activation.py``); N:M
packed weights (``nm.py``) use the sparse kernels."""
from __future__ import annotations

import math

import torch.fx as fx

from .....rewrite.graph import module_path, op_name
from .....rewrite import int8_layers as int8
from .. import nm
from ...program import Val, c_float, c_ints, contiguous_strides
from .base import INF, Unsupported, aten, conv_shape, float_in, handles, ident, nm_struct, pair, shape_of
from .lowerer import Lowerer


@handles(aten.conv2d.default, aten.convolution.default, aten.conv2d.padding)
def _conv(lw: Lowerer, node: fx.Node) -> Val:
    x = float_in(lw, node.args[0])
    w_node = node.args[1]
    if not lw.is_const(w_node):
        raise Unsupported("the weight is computed at run time; only constant weights are supported")
    w = lw.const_value(w_node).float()
    if w.dim() != 4 or len(x.shape) != 4:
        raise Unsupported("only 2-D convolutions (NCHW) are supported")
    if node.target == aten.conv2d.padding:
        a = list(node.args) + [None] * 7
        pad = a[4]
        if pad == "valid":
            padding = (0, 0)
        else:
            dil = pair(a[5] or 1)
            tot = [dil[i] * (w.shape[2 + i] - 1) for i in range(2)]
            if any(t % 2 for t in tot):
                raise Unsupported("padding='same' with an asymmetric pad")
            padding = (tot[0] // 2, tot[1] // 2)
        c = {"stride": pair(a[3] or 1), "padding": padding, "dilation": pair(a[5] or 1),
             "groups": int(a[6] or 1)}
    else:
        c = int8._conv_params(node)
        if c is None:
            raise Unsupported("transposed convolution")
    bias_node = node.args[2] if len(node.args) > 2 else None
    b = lw.const_val(bias_node, "f32") if bias_node is not None else None
    ys = shape_of(node)
    y = lw.new(ys, "f32")
    s, macs = conv_shape(x.shape, tuple(w.shape), ys, c)
    bptr = b.ptr() if b is not None else "NULL"
    packed = nm.detect(w, "conv") if lw.sparse else None
    name = ident(module_path(node) or node.name)
    if packed is not None:
        vals, idx = lw._nm_arrays(name, packed, "f32")
        code = (f"{{ {s} {nm_struct(packed, idx)}\n"
                f"  gr_conv2d_nm_f32(&s, &p, {x.ptr()}, {vals.name}, {bptr}, {y.out()}, @lo@, @hi@); }}")
        step = lw.emit("gr_conv2d_nm_f32", "gr_nm.c", code, [x], [y], macs * packed.n // packed.m,
                       params={"lo": -INF, "hi": INF},
                       op=op_name(node) + f" {packed.n}:{packed.m}")
    else:
        wv = lw.const_val(w_node, "f32")
        code = f"{{ {s}\n  gr_conv2d_f32(&s, {x.ptr()}, {wv.ptr()}, {bptr}, {y.out()}, @lo@, @hi@); }}"
        step = lw.emit("gr_conv2d_f32", "gr_conv.c", code, [x], [y], macs,
                       params={"lo": -INF, "hi": INF})
    lw._fusable[node] = step
    return y


@handles(aten.linear.default, aten.addmm.default)
def _linear(lw: Lowerer, node: fx.Node) -> Val:
    if node.target == aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            raise Unsupported("addmm with alpha/beta")
        bias_node, x_node, wt_node = node.args[:3]
        if not lw.is_const(wt_node):
            return _matmul(lw, node)
        w = lw.const_value(wt_node).float().t().contiguous()
    else:
        x_node, w_node = node.args[:2]
        bias_node = node.args[2] if len(node.args) > 2 else None
        if not lw.is_const(w_node):
            raise Unsupported("the weight is computed at run time")
        w = lw.const_value(w_node).float()
    x = float_in(lw, x_node)
    n_out, k = int(w.shape[0]), int(w.shape[1])
    rows = x.numel // k
    b = lw.const_val(bias_node, "f32") if bias_node is not None else None
    if b is not None and b.numel != n_out:
        raise Unsupported("broadcast bias")
    y = lw.new(shape_of(node), "f32")
    bptr = b.ptr() if b is not None else "NULL"
    packed = nm.detect(w, "linear") if lw.sparse else None
    name = ident(module_path(node) or node.name)
    if packed is not None:
        vals, idx = lw._nm_arrays(name, packed, "f32")
        code = (f"{{ {nm_struct(packed, idx)}\n  gr_linear_nm_f32(&p, {x.ptr()}, {vals.name}, "
                f"{bptr}, {y.out()}, {rows}, {n_out}, @lo@, @hi@); }}")
        step = lw.emit("gr_linear_nm_f32", "gr_nm.c", code, [x], [y], rows * k * n_out * packed.n // packed.m,
                       params={"lo": -INF, "hi": INF},
                       op=op_name(node) + f" {packed.n}:{packed.m}")
    else:
        if node.target == aten.addmm.default:
            wv = Val(lw.add_const(name + "_weight", w.numpy().reshape(-1), "f32"), tuple(w.shape),
                     contiguous_strides(tuple(w.shape)))
        else:
            wv = lw.const_val(node.args[1], "f32")
        code = f"gr_linear_f32({x.ptr()}, {wv.ptr()}, {bptr}, {y.out()}, {rows}, {k}, {n_out}, @lo@, @hi@);"
        step = lw.emit("gr_linear_f32", "gr_linalg.c", code, [x], [y], rows * k * n_out,
                       params={"lo": -INF, "hi": INF})
    lw._fusable[node] = step
    return y


def _b4(v: Val, batch: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Fold a view's leading batch dims into (b1, b2) strides + (row, col) strides."""
    lead, lead_st = v.shape[:-2], v.strides[:-2]
    pad = len(batch) - len(lead)
    lead, lead_st = (1,) * pad + lead, (0,) * pad + lead_st
    lead_st = tuple(0 if s == 1 and b != 1 else st for s, st, b in zip(lead, lead_st, batch))
    if len(batch) > 2:
        raise Unsupported("more than two batch dimensions")
    b = (1,) * (2 - len(batch)) + tuple(batch)
    st = (0,) * (2 - len(lead_st)) + lead_st
    return b, (st[0], st[1], v.strides[-2], v.strides[-1])


@handles(aten.bmm.default, aten.mm.default, aten.matmul.default)
def _matmul(lw: Lowerer, node: fx.Node) -> Val:
    if node.target == aten.addmm.default:
        raise Unsupported("addmm with a run-time weight")
    a, b = lw.val(node.args[0]), lw.val(node.args[1])
    if a.dtype != "f32" or b.dtype != "f32" or len(a.shape) < 2 or len(b.shape) < 2:
        raise Unsupported("matmul of non-float or 1-D tensors")
    ys = shape_of(node)
    batch = ys[:-2]
    (b1, b2), sa = _b4(a, batch)
    _, sb = _b4(b, batch)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    y = lw.new(ys, "f32")
    code = (f"{{ static const int32_t sa[4] = {c_ints(sa)}, sb[4] = {c_ints(sb)};\n"
            f"  gr_bmm_f32({b1}, {b2}, {m}, {k}, {n}, {a.ptr()}, sa, {b.ptr()}, sb, {y.out()}); }}")
    lw.emit("gr_bmm_f32", "gr_linalg.c", code, [a, b], [y], b1 * b2 * m * k * n)
    return y


@handles(aten.scaled_dot_product_attention.default)
def _sdpa(lw: Lowerer, node: fx.Node) -> Val:
    a = list(node.args) + [None] * 7
    q, k, v = (lw.val(x) for x in a[:3])
    mask_node = node.kwargs.get("attn_mask", a[3])
    dropout = node.kwargs.get("dropout_p", a[4] or 0.0)
    causal = bool(node.kwargs.get("is_causal", a[5] or False))
    scale = node.kwargs.get("scale", a[6])
    if node.kwargs.get("enable_gqa", False):
        raise Unsupported("grouped-query attention")
    if dropout:
        raise Unsupported("attention dropout")
    ys = shape_of(node)
    batch = ys[:-2]
    (b1, b2), qs = _b4(q, batch)
    _, ks = _b4(k, batch)
    _, vs = _b4(v, batch)
    t, d, s, dv = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    reads = [q, k, v]
    mask_ptr, ms = "NULL", (0, 0, 0, 0)
    if mask_node is not None:
        mv = lw.val(mask_node)
        if mv.dtype != "f32":
            raise Unsupported("boolean attention masks")
        _, ms = _b4(mv, batch)
        mask_ptr = mv.ptr()
        reads.append(mv)
    users = list(node.users)
    heads_last = len(ys) == 4 and len(users) == 1 and users[0].target == aten.transpose.int \
        and sorted(int(a) % 4 for a in users[0].args[1:3]) == [1, 2]
    if heads_last:  # written as [b1, t, b2, dv]: the transpose back to it is then free
        y = lw.new((ys[0], ys[2], ys[1], ys[3]), "f32")
        y = Val(y.buf, ys, (y.strides[0], y.strides[2], y.strides[1], y.strides[3]))
    else:
        y = lw.new(ys, "f32")
    lead = (0, 0) + tuple(y.strides[:-2])
    out_strides = (lead[-2], lead[-1], y.strides[-2])   # the (b1, b2, t) strides, as _b4 folds them
    scratch = lw.new((s,), "f32", name=(lw.current.name + "_scores"))
    code = (f"{{ static const int32_t qs[4] = {c_ints(qs)}, ks[4] = {c_ints(ks)}, vs[4] = {c_ints(vs)}, "
            f"ms[4] = {c_ints(ms)}, ys[3] = {c_ints(out_strides)};\n"
            f"  gr_sdpa_f32({b1}, {b2}, {t}, {s}, {d}, {dv}, {q.ptr()}, qs, {k.ptr()}, ks, {v.ptr()}, vs, "
            f"{mask_ptr}, ms, {y.out()}, ys, {c_float(scale)}, {int(causal)}, {scratch.out()}); }}")
    lw.emit("gr_sdpa_f32", "gr_linalg.c", code, reads, [y, scratch], b1 * b2 * t * s * (d + dv))
    return y
