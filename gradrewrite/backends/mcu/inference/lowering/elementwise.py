"""Elementwise binary ops with broadcasting (strided operands, in place where safe),
reductions over adjacent dimensions, layer norm, and inference batch norm (as a
broadcast multiply-add with folded per-channel constants)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ...program import Val, c_float, c_ints, contiguous_strides, numel
from .base import HANDLERS, Unsupported, aten, float_in, shape_of, handles
from .lowerer import Lowerer


BINARY = {aten.add.Tensor: "GR_ADD", aten.add_.Tensor: "GR_ADD", aten.sub.Tensor: "GR_SUB",
          aten.mul.Tensor: "GR_MUL", aten.mul_.Tensor: "GR_MUL", aten.div.Tensor: "GR_DIV",
          aten.maximum.default: "GR_MAX", aten.minimum.default: "GR_MIN",
          aten.add.Scalar: "GR_ADD", aten.sub.Scalar: "GR_SUB", aten.mul.Scalar: "GR_MUL",
          aten.div.Scalar: "GR_DIV"}


def _binary(lw: Lowerer, node: fx.Node) -> Val:
    op = BINARY[node.target]
    a_node, b_node = node.args[:2]
    alpha = float(node.kwargs.get("alpha", 1))
    ys = shape_of(node)
    if not isinstance(b_node, fx.Node) or not isinstance(a_node, fx.Node):
        if not isinstance(a_node, fx.Node):  # scalar OP tensor
            if op in ("GR_ADD", "GR_MUL"):
                a_node, b_node = b_node, a_node
            else:
                raise Unsupported("scalar on the left of sub/div")
        x = float_in(lw, a_node)
        y = lw.new(ys, "f32", inplace_of=x)
        code = f"gr_binary_scalar_f32({op}, {x.ptr()}, {c_float(float(b_node) * alpha)}, {y.out()}, {x.numel});"
        lw.emit("gr_binary_scalar_f32", "gr_elementwise.c", code, [x], [y])
        return y
    a, b = lw.val(a_node), lw.val(b_node)
    if a.dtype != "f32" or b.dtype != "f32":
        raise Unsupported("elementwise ops on non-float tensors")
    return _broadcast_binary(lw, op, a, b, ys, alpha)


def _broadcast_binary(lw: Lowerer, op: str, a: Val, b: Val, ys: tuple[int, ...], alpha: float) -> Val:
    def bstrides(v: Val) -> tuple[int, ...]:
        pad = len(ys) - len(v.shape)
        shape, strides = (1,) * pad + v.shape, (0,) * pad + v.strides
        return tuple(0 if s == 1 and d != 1 else st for s, st, d in zip(shape, strides, ys))
    nd = max(1, len(ys))
    shp = ys or (1,)
    sa, sb = bstrides(a) or (0,), bstrides(b) or (0,)
    # in place only over an input the other operand does not also read (x + x.t())
    cand = a if a.shape == ys else (b if b.shape == ys else None)
    y = lw.new(ys, "f32", inplace_of=cand if a.buf is not b.buf else None)
    code = (f"{{ static const int32_t sh[{nd}] = {c_ints(shp)}, sa[{nd}] = {c_ints(sa)}, sb[{nd}] = {c_ints(sb)};\n"
            f"  gr_binary_f32({op}, {nd}, sh, {a.ptr()}, sa, {b.ptr()}, sb, {c_float(alpha)}, {y.out()}); }}")
    lw.emit("gr_binary_f32", "gr_elementwise.c", code, [a, b], [y])
    return y


for _t in BINARY:
    HANDLERS[_t] = _binary


@handles(aten.layer_norm.default, aten.native_layer_norm.default)
def _layer_norm(lw: Lowerer, node: fx.Node) -> Any:
    a = list(node.args) + [None] * 6
    x = float_in(lw, a[0])
    cols = numel(tuple(a[1]))
    if node.target == aten.native_layer_norm.default:
        w, b, eps = a[2], a[3], a[4]
    else:
        w, b, eps = a[2], a[3], a[4] if a[4] is not None else 1e-5
    wv = lw.const_val(w, "f32").ptr() if w is not None else "NULL"
    bv = lw.const_val(b, "f32").ptr() if b is not None else "NULL"
    y = lw.new(x.shape, "f32")
    lw.emit("gr_layer_norm_f32", "gr_elementwise.c",
            f"gr_layer_norm_f32({x.ptr()}, {wv}, {bv}, {y.out()}, {x.numel // cols}, {cols}, {c_float(eps)});",
            [x], [y])
    if node.target == aten.native_layer_norm.default:
        return (y, None, None)
    return y


@handles(aten.mean.dim, aten.sum.dim_IntList)
def _reduce(lw: Lowerer, node: fx.Node) -> Val:
    x = float_in(lw, node.args[0])
    dims = sorted(int(d) % len(x.shape) for d in (node.args[1] or range(len(x.shape))))
    if dims != list(range(dims[0], dims[-1] + 1)):
        raise Unsupported("reduction over non-adjacent dimensions")
    if node.kwargs.get("dtype") is not None:
        raise Unsupported("reduction with a dtype")
    outer = numel(x.shape[:dims[0]])
    red = numel(x.shape[dims[0]:dims[-1] + 1])
    inner = numel(x.shape[dims[-1] + 1:])
    y = lw.new(shape_of(node), "f32")
    mean = int(node.target == aten.mean.dim)
    lw.emit("gr_reduce_f32", "gr_elementwise.c",
            f"gr_reduce_f32({x.ptr()}, {y.out()}, {outer}, {red}, {inner}, {mean});", [x], [y])
    return y


@handles(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
def _batch_norm(lw: Lowerer, node: fx.Node) -> Any:
    """Inference batch norm as y = x * scale[c] + shift[c] (fold-bn removes it entirely)."""
    a = list(node.args) + [None] * 9
    if node.target == aten.batch_norm.default:
        x_node, w, b, mean, var, training, eps = a[0], a[1], a[2], a[3], a[4], a[5], a[7]
    else:
        x_node, w, b, mean, var, eps = a[0], a[1], a[2], a[3], a[4], a[6]
        training = False
    if training or not all(lw.is_const(t) for t in (w, b, mean, var) if t is not None) or mean is None:
        raise Unsupported("training-mode batch norm (run the fold-bn pass or export in eval mode)")
    x = float_in(lw, x_node)
    c = x.shape[1]
    inv = torch.rsqrt(lw.const_value(var).double() + float(eps))
    scale = inv * (lw.const_value(w).double() if w is not None else 1.0)
    shift = (lw.const_value(b).double() if b is not None else 0.0) - lw.const_value(mean).double() * scale
    bshape = (c,) + (1,) * (len(x.shape) - 2)
    sv = Val(lw.add_const(node.name + "_scale", scale.float().numpy(), "f32"), bshape, contiguous_strides(bshape))
    hv = Val(lw.add_const(node.name + "_shift", shift.float().numpy(), "f32"), bshape, contiguous_strides(bshape))
    y = x
    for op, const in (("GR_MUL", sv), ("GR_ADD", hv)):
        y = _broadcast_binary(lw, op, y, const, x.shape, 1.0)
    return (y, None, None) if node.target != aten.batch_norm.default else y


@handles(aten.pad.default, aten.constant_pad_nd.default)
def _pad(lw: Lowerer, node: fx.Node) -> Val:
    """Constant padding of the last two dims (EfficientNet's "same" padding)."""
    from .int8_elementwise import NotInt8, pad_value, pads
    x = float_in(lw, node.args[0])
    try:
        top, bottom, left, right = pads(node)
    except NotInt8 as exc:
        raise Unsupported(str(exc)) from None
    y = lw.new(shape_of(node), "f32")
    outer, h, w = numel(x.shape[:-2]), x.shape[-2], x.shape[-1]
    lw.emit("gr_pad_f32", "gr_elementwise.c",
            f"gr_pad_f32({x.ptr()}, {y.out()}, {outer}, {h}, {w}, {top}, {bottom}, {left}, {right}, "
            f"{c_float(pad_value(node))});", [x], [y])
    return y
