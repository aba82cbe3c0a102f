"""Activations and softmax: clamps (relu, relu6, hardtanh, clamp) folded into the
conv/linear that produces their input when they are its only reader, the other
unary activations (``gr_unary_f32``), gelu, and (log-)softmax over the last dimension."""
from __future__ import annotations

import torch.fx as fx

from .....rewrite.graph import op_name
from ...program import Val, c_float
from .base import HANDLERS, INF, Unsupported, aten, float_in, handles
from .lowerer import Lowerer


def _clamp_bounds(node: fx.Node) -> tuple[float, float]:
    t = node.target
    if t in (aten.relu.default, aten.relu_.default):
        return 0.0, INF
    if t in (aten.hardtanh.default, aten.hardtanh_.default):
        a = list(node.args) + [None, None]
        return float(a[1] if a[1] is not None else -1.0), float(a[2] if a[2] is not None else 1.0)
    if t == aten.relu6.default:
        return 0.0, 6.0
    a = list(node.args) + [None, None]
    lo = node.kwargs.get("min", a[1])
    hi = node.kwargs.get("max", a[2])
    return (-INF if lo is None else float(lo)), (INF if hi is None else float(hi))


@handles(aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
         aten.relu6.default, aten.clamp.default)
def _clamp(lw: Lowerer, node: fx.Node) -> Val:
    lo, hi = _clamp_bounds(node)
    src = node.args[0]
    step = lw._fusable.get(src)
    if step is not None and len(src.users) == 1 and step is lw.steps[-1]:
        # fold into the producing conv/linear: its output is clamped as it is written
        step.params.update(lo=max(lo, step.params["lo"]), hi=min(hi, step.params["hi"]))
        step.op += "+" + op_name(node)
        lw._fusable[node] = step
        return lw.vals[src]
    return _unary(lw, node, "GR_CLAMP", lo, hi)


def _unary(lw: Lowerer, node: fx.Node, op: str, lo: float = 0.0, hi: float = 0.0) -> Val:
    x = float_in(lw, node.args[0])
    y = lw.new(x.shape, "f32", inplace_of=x)
    code = f"gr_unary_f32({op}, {x.ptr()}, {y.out()}, {x.numel}, {c_float(lo)}, {c_float(hi)});"
    lw.emit("gr_unary_f32", "gr_elementwise.c", code, [x], [y])
    return y


UNARY = {aten.hardswish.default: "GR_HARDSWISH", aten.hardswish_.default: "GR_HARDSWISH",
         aten.hardsigmoid.default: "GR_HARDSIGMOID", aten.sigmoid.default: "GR_SIGMOID",
         aten.tanh.default: "GR_TANH", aten.silu.default: "GR_SILU", aten.silu_.default: "GR_SILU",
         aten.neg.default: "GR_NEG", aten.exp.default: "GR_EXP", aten.sqrt.default: "GR_SQRT",
         aten.rsqrt.default: "GR_RSQRT"}
for _t, _op in UNARY.items():
    HANDLERS[_t] = (lambda op: lambda lw, node: _unary(lw, node, op))(_op)


@handles(aten.gelu.default)
def _gelu(lw: Lowerer, node: fx.Node) -> Val:
    approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return _unary(lw, node, "GR_GELU_TANH" if approx == "tanh" else "GR_GELU_ERF")


@handles(aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int)
def _softmax(lw: Lowerer, node: fx.Node) -> Val:
    x = float_in(lw, node.args[0])
    dim = int(node.args[1]) % max(1, len(x.shape))
    if dim != len(x.shape) - 1:
        raise Unsupported("softmax over a dimension other than the last")
    log = int(node.target in (aten._log_softmax.default, aten.log_softmax.int))
    cols = x.shape[-1]
    y = lw.new(x.shape, "f32")
    lw.emit("gr_softmax_f32", "gr_elementwise.c",
            f"gr_softmax_f32({x.ptr()}, {y.out()}, {x.numel // cols}, {cols}, {log});", [x], [y])
    return y
