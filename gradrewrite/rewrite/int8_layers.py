"""int8 conv/linear patterns of static QDQ graphs and their integer parameters.

The quantize pass leaves ``quantize(act(layer(dequant(xq), dequant_per_channel(wq), b)))``
chains (act: optional relu / relu6 / hardtanh). Each becomes one integer kernel with
TFLite / CMSIS-NN semantics: int32 accumulation of ``wq * (xq - zx)``, bias
``round(b / (s_x * s_w[c]))``, then ``y = clamp(zy + requant(acc), lo, hi)`` where
``requant(acc) = (acc * mult + 2^(t-1)) >> t``, ``t = 31 - shift``, and
``mult * 2^(shift-31) ~= s_x * s_w[c] / s_y`` (CMSIS-NN's single-rounding requantize).

A conv/linear whose output stays float (``quantize(outputs=auto)``: its readers compute in
float) is ``layer(dequant(xq), dequant_per_channel(wq), b)`` with no quantize after it
(``find(graph, float_outputs=True)``): the same int32 accumulator, bias included, and
``y = float32(acc) * out_scale[c]`` with ``out_scale = float32(s_x * s_w[c])`` instead of
the requantization (ORT's QGemm / QLinearMatMul with an int32 bias and a float output).
One IEEE multiply per output: the C and TVM kernels give the reference's bits.

``integer_reference`` runs a graph with every such chain computed by that integer
arithmetic in numpy/torch (everything else as the fake-quant torch graph): the mcu
backend's C code and the tvm backend's int8 Relax lowering both match it bit for bit
(which is why it lives here, shared by the backends, rather than in either).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from .quant_ops import DEQUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_TENSOR

aten = torch.ops.aten

CONV_OPS = (aten.conv2d.default, aten.convolution.default)
LINEAR_OPS = (aten.linear.default,)
ADD_OPS = (aten.add.Tensor, aten.add_.Tensor)
VIEW_OPS = (aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten._unsafe_view.default)
ACT_OPS = (aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
           aten.clamp.default)


@dataclass
class QLayer:
    head: fx.Node            # the quantize node: the pattern's output
    layer: fx.Node           # conv / linear / add
    act: fx.Node | None
    x: fx.Node               # the int8 input tensor (add: the first one)
    kind: str                # "conv" | "linear" | "add"
    weight: torch.Tensor | None  # int8, [O, ...]
    w_scales: np.ndarray | None  # float64 [O]
    bias_q: np.ndarray | None    # int32 [O]
    mult: np.ndarray         # int32 [O] (add: [out, a, b])
    shift: np.ndarray        # int32 [O] (add: [out, a, b])
    in_zp: int
    out_zp: int
    act_min: int
    act_max: int
    conv: dict | None        # stride, padding, dilation, groups
    view: fx.Node | None = None  # a flatten/view between the input dequant and a linear
    x2: fx.Node | None = None    # add: the second int8 input
    in2_zp: int = 0
    # max pools between the layer and the quantize: quantization is monotone, so
    # quantize(maxpool(y)) == maxpool(quantize(y)) and they run on int8 after the layer
    post: tuple[fx.Node, ...] = ()
    # a float-output layer (head is the layer node): y = float32(acc) * out_scale, float32 [O];
    # mult / shift / out_zp / act_min / act_max are unused
    out_scale: np.ndarray | None = None

    @property
    def float_out(self) -> bool:
        return self.out_scale is not None

    @property
    def inputs(self) -> list[fx.Node]:
        return [self.x] + ([self.x2] if self.x2 is not None else [])


ADD_SHIFT = 20   # TFLite's left shift for int8 add: inputs are rescaled at 2^20 resolution


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``real ~= mult * 2^(shift - 31)`` with ``mult`` in [2^30, 2^31)."""
    if real <= 0:
        return 0, 0
    frac, exp = math.frexp(real)
    mult = int(round(frac * (1 << 31)))
    if mult == 1 << 31:
        mult //= 2
        exp += 1
    if exp > 30:
        raise ValueError(f"requantization scale {real:g} is too large for a 32-bit multiplier")
    if exp < -31:  # the product rounds to 0 anyway
        return 0, 0
    return mult, exp


def requantize(acc: np.ndarray, mult: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The kernel's ``gr_requantize`` in int64 numpy (broadcast per channel)."""
    acc = acc.astype(np.int64)
    total = (31 - shift).astype(np.int64)
    return ((acc * mult.astype(np.int64) + (np.int64(1) << (total - 1))) >> total).astype(np.int64)


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return len(node.users) == 1 and next(iter(node.users)) is user


def _const(graph, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return graph.attr(node).detach()
    return None


def _conv_params(node: fx.Node) -> dict | None:
    a = list(node.args) + [None] * 9
    if node.target == aten.convolution.default:
        if a[6] or any(a[7] or ()):
            return None
        stride, padding, dilation, groups = a[3], a[4], a[5], a[8]
    else:
        stride, padding, dilation, groups = a[3] or 1, a[4] or 0, a[5] or 1, a[6] or 1
    pair = lambda v: tuple(v) * (2 // len(v)) if isinstance(v, (list, tuple)) else (v, v)  # noqa: E731
    if isinstance(padding, str):
        return None
    return {"stride": pair(stride), "padding": pair(padding), "dilation": pair(dilation),
            "groups": int(groups)}


def _act_bounds(node: fx.Node) -> tuple[float, float]:
    if node.target in (aten.relu.default, aten.relu_.default):
        return 0.0, math.inf
    a = list(node.args) + [None, None]
    if node.target == aten.clamp.default:
        return (-math.inf if a[1] is None else float(a[1])), (math.inf if a[2] is None else float(a[2]))
    return float(-1.0 if a[1] is None else a[1]), float(1.0 if a[2] is None else a[2])


def _int8_dequant(node) -> bool:
    return isinstance(node, fx.Node) and node.target == DEQUANTIZE_PER_TENSOR and node.args[5] == torch.int8


def match(graph, head: fx.Node) -> QLayer | None:
    """The int8 layer ending in quantize node ``head``, or None."""
    if head.target != QUANTIZE_PER_TENSOR or head.args[5] != torch.int8:
        return None
    y_scale, y_zp, qmin, qmax = (float(head.args[1]), int(head.args[2]), int(head.args[3]),
                                 int(head.args[4]))
    node, act, user, post = head.args[0], None, head, []
    lo, hi = -math.inf, math.inf
    while isinstance(node, fx.Node) and _only_user(node, user):
        if node.target in ACT_OPS:
            a_lo, a_hi = _act_bounds(node)
            lo, hi = max(lo, a_lo), min(hi, a_hi)
            act = act or node
        elif node.target == aten.max_pool2d.default:
            post.insert(0, node)
        else:
            break
        user, node = node, node.args[0]
    if not isinstance(node, fx.Node) or not _only_user(node, user):
        return None

    def q(v: float) -> float:
        return y_zp + round(v / y_scale) if math.isfinite(v) else v
    act_min = int(max(qmin, q(lo))) if math.isfinite(lo) else qmin
    act_max = int(min(qmax, q(hi))) if math.isfinite(hi) else qmax
    if node.target in ADD_OPS:
        return _match_add(node, head, act, y_scale, y_zp, act_min, act_max, tuple(post))
    if node.target not in CONV_OPS + LINEAR_OPS:
        return None
    mac = _mac_parts(graph, node)
    if mac is None or (mac["kind"] == "linear" and post):
        return None
    s_w = mac["w_scales"]
    mults, shifts = zip(*(quantize_multiplier(mac["x_scale"] * float(s) / y_scale) for s in s_w))
    return QLayer(head, node, act, mac["x"], mac["kind"], mac["weight"], s_w, mac["bias_q"],
                  np.asarray(mults, np.int32), np.asarray(shifts, np.int32), mac["in_zp"], y_zp,
                  act_min, act_max, mac["conv"], mac["view"], post=tuple(post))


def match_float_output(graph, node: fx.Node) -> QLayer | None:
    """The int8 conv/linear ``node`` as a float-output layer (see the module docstring),
    or None when it does not read an int8 input and int8 weights."""
    if node.op != "call_function" or node.target not in CONV_OPS + LINEAR_OPS:
        return None
    mac = _mac_parts(graph, node)
    if mac is None:
        return None
    n_out = len(mac["w_scales"])
    out_scale = (mac["x_scale"] * mac["w_scales"]).astype(np.float32)
    return QLayer(node, node, None, mac["x"], mac["kind"], mac["weight"], mac["w_scales"], mac["bias_q"],
                  np.zeros(n_out, np.int32), np.zeros(n_out, np.int32), mac["in_zp"], 0, -128, 127,
                  mac["conv"], mac["view"], out_scale=out_scale)


def _mac_parts(graph, node: fx.Node) -> dict | None:
    """The integer parts of conv/linear ``node`` reading ``dequant(xq)`` (through a
    flatten/view for a linear) and ``dequant_per_channel(wq)`` with a constant bias:
    int8 input node, weight, scales, int32 bias, zero point; None when it does not."""
    x_dq, w_dq = node.args[0], node.args[1]
    view = None
    if isinstance(x_dq, fx.Node) and x_dq.target in VIEW_OPS and node.target in LINEAR_OPS \
            and _only_user(x_dq, node):
        view, x_dq = x_dq, x_dq.args[0]   # flatten(dequant(x)) == dequant(flatten(x))
    bias_node = node.args[2] if len(node.args) > 2 else None
    if not _int8_dequant(x_dq):
        return None
    if not (isinstance(w_dq, fx.Node) and w_dq.target == DEQUANTIZE_PER_CHANNEL
            and _only_user(w_dq, node) and int(w_dq.args[3]) == 0):
        return None
    wq, w_scales, w_zps = (_const(graph, a) for a in w_dq.args[:3])
    if wq is None or w_scales is None or wq.dtype != torch.int8:
        return None
    if w_zps is not None and bool((w_zps != 0).any()):
        return None  # symmetric weights only, as CMSIS-NN
    bias = None
    if bias_node is not None:
        bias = _const(graph, bias_node)
        if bias is None:
            return None
    kind = "linear" if node.target in LINEAR_OPS else "conv"
    conv = _conv_params(node) if kind == "conv" else None
    if kind == "conv" and (conv is None or wq.dim() != 4):
        return None
    x_scale = float(x_dq.args[1])
    s_w = w_scales.double().numpy()
    bias_q = (np.round(bias.double().numpy() / (x_scale * s_w)) if bias is not None
              else np.zeros(len(s_w)))
    bias_q = np.clip(bias_q, -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
    return {"x": x_dq.args[0], "x_scale": x_scale, "in_zp": int(x_dq.args[2]), "weight": wq.detach().clone(),
            "w_scales": s_w, "bias_q": bias_q, "kind": kind, "conv": conv, "view": view}


def _match_add(node, head, act, y_scale, y_zp, act_min, act_max, post) -> QLayer | None:
    """quantize(add(dequant(a), dequant(b))) as TFLite's int8 add: both inputs rescaled
    to 2 * max(s_a, s_b) at 2^20 resolution, summed, requantized to the output."""
    a, b = node.args[:2]
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2 or not (_int8_dequant(a) and _int8_dequant(b)):
        return None
    shapes = [tuple(n.meta["val"].shape) for n in (a, b, node)]
    if shapes[0] != shapes[2] or shapes[1] != shapes[2]:
        return None  # no broadcasting
    s_a, s_b = float(a.args[1]), float(b.args[1])
    twice = 2 * max(s_a, s_b)
    m_a, e_a = quantize_multiplier(s_a / twice)
    m_b, e_b = quantize_multiplier(s_b / twice)
    m_o, e_o = quantize_multiplier(twice / ((1 << ADD_SHIFT) * y_scale))
    return QLayer(head, node, act, a.args[0], "add", None, None, None,
                  np.array([m_o, m_a, m_b], np.int32), np.array([e_o, e_a, e_b], np.int32),
                  int(a.args[2]), y_zp, act_min, act_max, None, x2=b.args[0], in2_zp=int(b.args[2]),
                  post=post)


def find(graph, float_outputs: bool = False) -> dict[fx.Node, QLayer]:
    """Every int8 layer pattern of the graph, keyed by its quantize node, in graph order;
    with ``float_outputs`` also the int8 conv/linear layers whose output stays float
    (``match_float_output``), keyed by the layer node."""
    heads = {}
    for node in graph.gm.graph.nodes:
        if node.op == "call_function" and node.target == QUANTIZE_PER_TENSOR:
            try:
                ql = match(graph, node)
            except ValueError:
                ql = None
            if ql is not None:
                heads[node] = ql
    if not float_outputs:
        return heads
    taken = {ql.layer for ql in heads.values()}
    found = {}
    for node in graph.gm.graph.nodes:
        if node in heads:
            found[node] = heads[node]
        elif node not in taken:
            ql = match_float_output(graph, node)
            if ql is not None:
                found[node] = ql
    return found


def run_layer(ql: QLayer, xq: torch.Tensor, xq2: torch.Tensor | None = None) -> torch.Tensor:
    """The integer kernel's result for int8 input(s) (exact: float64 holds the sums)."""
    if ql.kind == "add":
        y = _run_add(ql, xq, xq2)
    else:
        y = _run_mac(ql, xq)
    for pool in ql.post:  # max pools commute with the (monotone) quantization
        a = list(pool.args) + [None] * 5
        y = torch.nn.functional.max_pool2d(y.double(), a[1], a[2] or a[1], a[3] or 0, a[4] or 1,
                                           bool(a[5])).to(torch.int8)
    return y


def _run_add(ql: QLayer, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m, e = ql.mult.astype(np.int64), ql.shift.astype(np.int64)
    av = requantize((a.numpy().astype(np.int64) - ql.in_zp) << ADD_SHIFT, m[1], e[1])
    bv = requantize((b.numpy().astype(np.int64) - ql.in2_zp) << ADD_SHIFT, m[2], e[2])
    y = requantize(av + bv, m[0], e[0]) + ql.out_zp
    return torch.from_numpy(np.clip(y, ql.act_min, ql.act_max).astype(np.int8))


def _run_mac(ql: QLayer, xq: torch.Tensor) -> torch.Tensor:
    x = xq.to(torch.float64) - ql.in_zp
    if ql.view is not None:
        x = x.reshape(tuple(ql.view.meta["val"].shape))
    w = ql.weight.to(torch.float64)
    if ql.kind == "conv":
        c = ql.conv
        acc = torch.nn.functional.conv2d(x, w, None, c["stride"], c["padding"], c["dilation"], c["groups"])
        channel_axis = 1
    else:
        acc = x @ w.t()
        channel_axis = acc.dim() - 1
    acc = acc.round().to(torch.int64).numpy()
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    acc = acc + ql.bias_q.astype(np.int64).reshape(shape)
    if ql.float_out:   # one float32 multiply per output, as the kernels
        return torch.from_numpy(acc.astype(np.float32) * ql.out_scale.reshape(shape))
    y = requantize(acc, ql.mult.reshape(shape), ql.shift.reshape(shape)) + ql.out_zp
    return torch.from_numpy(np.clip(y, ql.act_min, ql.act_max).astype(np.int8))


def integer_reference(graph, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run ``graph`` with every int8 layer pattern (float-output layers included) computed
    in integer arithmetic."""
    layers = find(graph, float_outputs=True)

    class _Interp(fx.Interpreter):
        def run_node(self, n):
            if n in layers:
                return run_layer(layers[n], *(self.env[x] for x in layers[n].inputs))
            return super().run_node(n)

    with torch.no_grad():
        out = _Interp(graph.gm, garbage_collect_values=False).run(*inputs)
    from torch.utils import _pytree as pytree
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
