"""int8 ops between the int8 conv/linear layers: adds whose output fans out, multiplies
(squeeze-excitation's gate), average pooling, table activations (hardswish,
hardsigmoid, sigmoid, ...), concat and constant pad.

The quantize pass only puts quantize/dequantize pairs around conv/linear layers, so
these ops see float inputs (``dequantize(q)``) and a float result that a later
layer quantizes. ``plan`` picks the ops that can run on the int8 values instead: every
tensor input is int8 (a dequantize's input, or another planned op's result) and
every reader of the result is int8 too (a quantize, which then costs nothing, or
another planned op). The result's scale and zero point come from that quantize;
without one, sigmoid/hardsigmoid take TFLite's fixed 1/256, -128, pad/pooling/relu
keep their input's, and the others cover the range their int8 inputs can reach. The
walk repeats until no op drops out (an op that cannot run int8 takes its inputs' and
readers' chances with it).

This changes what the model computes: a planned op reads the *quantized* tensors
(TFLite's semantics), not the float values the fake-quant graph passes around.
``reference.integer_reference`` runs the same plan in numpy, and the C kernels
(``gr_int8_elementwise.c``) match it bit for bit. Ops that stay fp32 get a reason
(``gradrewrite check`` lists them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from .....passes.quantize.observers import qparams
from .....rewrite import int8_layers as int8
from .....rewrite.graph import module_path, op_name
from .....rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_TENSOR
from ...program import Val, numel
from .base import HANDLERS, Unsupported, aten, ident, pair, pool_shape

ADD = (aten.add.Tensor, aten.add_.Tensor)
MUL = (aten.mul.Tensor, aten.mul_.Tensor)
AVG = (aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default,
       aten.mean.dim)
CAT = (aten.cat.default,)
PAD = (aten.pad.default, aten.constant_pad_nd.default)
# reshapes and identities (eval dropout) keep the element order: an int8 tensor passes through
RESHAPE = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
           aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
           aten.alias.default, aten.detach.default, aten.dropout.default, aten.feature_dropout.default,
           aten.clone.default, aten.contiguous.default)


def _relu6(x):
    return np.clip(x, 0.0, 6.0)


# float64 definitions of the table activations (torch's formulas)
LUT: dict[Any, Callable[[np.ndarray], np.ndarray]] = {
    aten.hardswish.default: lambda x: x * _relu6(x + 3.0) / 6.0,
    aten.hardswish_.default: lambda x: x * _relu6(x + 3.0) / 6.0,
    aten.hardsigmoid.default: lambda x: _relu6(x + 3.0) / 6.0,
    aten.sigmoid.default: lambda x: 1.0 / (1.0 + np.exp(-x)),
    aten.silu.default: lambda x: x / (1.0 + np.exp(-x)),
    aten.silu_.default: lambda x: x / (1.0 + np.exp(-x)),
    aten.tanh.default: np.tanh,
    aten.relu.default: lambda x: np.maximum(x, 0.0),
    aten.relu_.default: lambda x: np.maximum(x, 0.0),
    aten.relu6.default: _relu6,
}
FIXED_OUT = {aten.sigmoid.default: (1.0 / 256, -128), aten.hardsigmoid.default: (1.0 / 256, -128)}
SAME_SCALE = PAD + AVG + RESHAPE + (aten.relu.default, aten.relu_.default, aten.relu6.default)
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
         aten.unflatten.int, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
         aten.view_as.default, aten.permute.default, aten.transpose.int, aten.t.default, aten.expand.default,
         aten.slice.Tensor, aten.select.int, aten.alias.default, aten.detach.default, aten.dropout.default,
         aten.clone.default, aten.contiguous.default}
QDQ = (QUANTIZE_PER_TENSOR, DEQUANTIZE_PER_TENSOR, DEQUANTIZE_PER_CHANNEL)


class NotInt8(Exception):
    """This op stays fp32; the message says why."""


@dataclass
class QElem:
    node: fx.Node
    kind: str                          # add | mul | avg | lut | cat | pad | view
    srcs: list[fx.Node]                # the nodes holding the int8 inputs, in argument order
    in_q: list[tuple[float, int]]      # their (scale, zero point)
    out_q: tuple[float, int]
    p: dict = field(default_factory=dict)  # kind-specific integer parameters


@dataclass
class Plan:
    elems: dict[fx.Node, QElem]
    aliases: dict[fx.Node, fx.Node]    # quantize node -> planned op whose int8 result it is
    fp32: dict[fx.Node, str]           # candidates that stay fp32 -> why


def _qparams(node: fx.Node) -> tuple[float, int] | None:
    """(scale, zero point) of an int8 [-128, 127] quantize/dequantize with constant parameters."""
    a = node.args
    if len(a) != 6 or a[5] != torch.int8 or (int(a[3]), int(a[4])) != (-128, 127) \
            or any(isinstance(v, fx.Node) for v in a[1:3]):
        return None
    return float(a[1]), int(a[2])


def rescale(s_in: float, s_out: float) -> tuple[int, int]:
    """mult, shift of a requantization by ``s_in / s_out`` (ValueError when too large)."""
    return int8.quantize_multiplier(s_in / s_out)


def round_half_up(v: np.ndarray) -> np.ndarray:
    return np.floor(v + 0.5)


def lut_table(fn, in_q: tuple[float, int], out_q: tuple[float, int]) -> np.ndarray:
    """int8 -> int8 table of ``fn``: y = clamp(round_half_up(fn((q - zi) * si) / so) + zo)."""
    q = np.arange(-128, 128, dtype=np.float64)
    y = round_half_up(fn((q - in_q[1]) * in_q[0]) / out_q[0]) + out_q[1]
    return np.clip(y, -128, 127).astype(np.int8)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    if node.target in CAT:
        return list(node.args[0])
    if node.target in ADD + MUL:
        return list(node.args[:2])
    return [node.args[0]]


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in node.meta["val"].shape)


def _avg_params(node: fx.Node) -> dict:
    """Window, stride, padding, ceil mode, count_include_pad, divisor of an average pool."""
    xs, ys = _shape(node.args[0]), _shape(node)
    if len(xs) != 4:
        raise NotInt8("only NCHW average pooling")
    h, w = xs[2:]
    if node.target == aten.mean.dim:
        dims = sorted(int(d) % 4 for d in node.args[1])
        if dims != [2, 3] or node.kwargs.get("dtype") is not None:
            raise NotInt8("int8 mean only over H and W")
        return {"k": (h, w), "s": (h, w), "pad": (0, 0), "cip": 1, "div": 0, "oh": 1, "ow": 1}
    if node.target != aten.avg_pool2d.default:   # adaptive
        oh, ow = ys[2], ys[3]
        if h % oh or w % ow:
            raise NotInt8("adaptive pooling with uneven windows")
        return {"k": (h // oh, w // ow), "s": (h // oh, w // ow), "pad": (0, 0), "cip": 1, "div": 0,
                "oh": oh, "ow": ow}
    a = list(node.args) + [None] * 7
    k = pair(a[1])
    return {"k": k, "s": pair(a[2]) if a[2] else k, "pad": pair(a[3] or 0),
            "cip": 1 if a[5] is None else int(bool(a[5])), "div": int(a[6] or 0), "oh": ys[2], "ow": ys[3]}


def pads(node: fx.Node) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a constant pad over the last two dims."""
    a = list(node.args) + [None, None]
    if node.target == aten.pad.default and (a[2] or "constant") != "constant":
        raise NotInt8(f"{a[2]} padding")
    pads = [int(v) for v in a[1]] + [0] * 4
    if any(pads[4:]) or len(_shape(node)) < 2:
        raise NotInt8("pad of dims other than the last two")
    if min(pads) < 0:
        raise NotInt8("negative padding (cropping)")
    left, right, top, bottom = pads[:4]
    return top, bottom, left, right


def pad_value(node: fx.Node) -> float:
    a = list(node.args) + [None, None]
    return float((a[3] if node.target == aten.pad.default else a[2]) or 0.0)


def _params(node: fx.Node, kind: str, in_q: list, out_q: tuple[float, int]) -> dict:
    """The integer parameters of planned op ``node`` (NotInt8 when the shapes do not fit)."""
    ys = _shape(node)
    so = out_q[0]
    try:
        if kind == "add":
            if node.kwargs.get("alpha", 1) != 1 or any(_shape(a) != ys for a in node.args[:2]):
                raise NotInt8("broadcasting or scaled add")
            (sa, _), (sb, _) = in_q   # TFLite's add: both rescaled to 2 * max scale at 2^20
            twice = 2 * max(sa, sb)
            m = [int8.quantize_multiplier(v) for v in (twice / ((1 << int8.ADD_SHIFT) * so), sa / twice, sb / twice)]
            return {"mult": np.array([v[0] for v in m], np.int32), "shift": np.array([v[1] for v in m], np.int32)}
        if kind == "mul":
            shapes = [_shape(a) for a in node.args[:2]]
            full = [i for i, s in enumerate(shapes) if s == ys]
            if not full:
                raise NotInt8("broadcasting of both operands")
            a_i = full[0]
            b_s = (1,) * (len(ys) - len(shapes[1 - a_i])) + shapes[1 - a_i]
            k = len(ys)
            while k > 0 and b_s[k - 1] == 1 and ys[k - 1] != 1:
                k -= 1
            if b_s[:k] != ys[:k] or any(v != 1 for v in b_s[k:]):
                raise NotInt8("broadcast other than per leading index (x * gate[n, c, 1, 1])")
            mult, shift = int8.quantize_multiplier(in_q[0][0] * in_q[1][0] / so)
            outer, inner = numel(ys[:k]), numel(ys[k:])
            return {"a": a_i, "outer": outer, "inner": inner, "b_inner": inner if k == len(ys) else 1,
                    "mult": mult, "shift": shift}
        if kind == "avg":
            p = _avg_params(node)
            size = max(p["k"][0] * p["k"][1], p["div"]) + 1
            m = [rescale(in_q[0][0], so * d) if d else (0, 0) for d in range(size)]
            return {**p, "mult": np.array([v[0] for v in m], np.int32), "shift": np.array([v[1] for v in m], np.int32)}
        if kind == "lut":
            return {"table": lut_table(LUT[node.target], in_q[0], out_q)}
        if kind == "view":
            return {}
        rs = [None if q == out_q else rescale(q[0], so) for q in in_q]
        if kind == "cat":
            return {"dim": int(node.args[1] if len(node.args) > 1 else 0) % len(ys), "rescale": rs}
        value = int(np.clip(round_half_up(np.float64(pad_value(node)) / so) + out_q[1], -128, 127))
        return {"pads": pads(node), "value": value, "rescale": rs[0]}
    except ValueError as exc:   # a scale ratio beyond the 32-bit multiplier
        raise NotInt8(str(exc)) from None


def _kind(node: fx.Node) -> str | None:
    t = node.target
    return ("add" if t in ADD else "mul" if t in MUL else "avg" if t in AVG else "lut" if t in LUT
            else "cat" if t in CAT else "pad" if t in PAD else "view" if t in RESHAPE else None)


def plan(graph, qlayers: dict[fx.Node, int8.QLayer]) -> Plan:
    """The int8 elementwise ops of an int8 QDQ graph (see the module docstring)."""
    nodes = list(graph.gm.graph.nodes)
    if not qlayers:
        return Plan({}, {}, {})
    taken = set()   # nodes inside the int8 conv/linear/add patterns
    for ql in qlayers.values():
        taken.update(n for n in (ql.layer, ql.act, ql.view, *ql.post) if n is not None)
    cands = [n for n in nodes if n.op == "call_function" and n not in taken and _kind(n) is not None]
    alive, reasons = set(cands), {}
    while True:
        elems: dict[fx.Node, QElem] = {}
        dropped = False
        for n in cands:
            if n not in alive:
                continue
            try:
                elems[n] = _plan_one(n, elems, alive)
            except NotInt8 as exc:
                alive.discard(n)
                reasons[n] = str(exc)
                dropped = True
        if not dropped:
            break
    aliases = {u: n for n in elems for u in n.users if _is_quantize(u, n)}   # same parameters (_plan_one)
    return Plan(elems, aliases, reasons)


def _plan_one(n: fx.Node, elems: dict[fx.Node, QElem], alive: set[fx.Node]) -> QElem:
    kind = _kind(n)
    srcs, in_q = [], []
    for a in _tensor_args(n):
        if not isinstance(a, fx.Node):
            raise NotInt8("a constant operand")
        if a.target == DEQUANTIZE_PER_TENSOR and _qparams(a) is not None and isinstance(a.args[0], fx.Node):
            srcs.append(a.args[0])
            in_q.append(_qparams(a))
        elif a in elems:
            srcs.append(a)
            in_q.append(elems[a].out_q)
        else:
            raise NotInt8(f"input {a.name} is not int8 ({op_name(a)} runs fp32)")
    for u in n.users:
        if not _is_quantize(u, n) and u not in alive:
            raise NotInt8(f"its result is read by {op_name(u)}" + (" (a graph output)" if u.op == "output"
                                                                   else ", which runs fp32"))
    outs = _quantized_as(n)
    if len(outs) > 1:
        raise NotInt8("quantized to two different scales")
    if kind == "view":
        if outs and outs != {in_q[0]}:
            raise NotInt8("quantized to two different scales")
        outs = set()
    if outs:
        out_q = outs.pop()
    elif n.target in FIXED_OUT:
        out_q = FIXED_OUT[n.target]
    elif n.target in SAME_SCALE or (kind == "cat" and len(set(in_q)) == 1):
        out_q = in_q[0]
    else:
        out_q = qparams(*_reach(n, kind, in_q))
    return QElem(n, kind, srcs, in_q, out_q, _params(n, kind, in_q, out_q))


def _is_quantize(u: fx.Node, n: fx.Node) -> bool:
    return u.target == QUANTIZE_PER_TENSOR and u.args[0] is n and _qparams(u) is not None


def _quantized_as(n: fx.Node) -> set[tuple[float, int]]:
    """The parameters of the quantizes of ``n``'s result, through reshapes (pool -> flatten
    -> quantize): the view passes the int8 tensor on, so its quantize fixes the op's."""
    outs = set()
    for u in n.users:
        if _is_quantize(u, n):
            outs.add(_qparams(u))
        elif u.target in RESHAPE:
            outs |= _quantized_as(u)
    return outs


def _reach(n: fx.Node, kind: str, in_q: list[tuple[float, int]]) -> tuple[float, float]:
    """The range of float values op ``n`` can produce from int8 inputs: its output scale
    when no quantize after it was calibrated (the SE block's input, read only by the pool
    and the gate multiply)."""
    lims = [((-128 - z) * s, (127 - z) * s) for s, z in in_q]
    if kind == "add":
        return lims[0][0] + lims[1][0], lims[0][1] + lims[1][1]
    if kind == "mul":
        ends = [a * b for a in lims[0] for b in lims[1]]
        return min(ends), max(ends)
    if kind == "lut":
        s, z = in_q[0]
        y = LUT[n.target]((np.arange(-128, 128, dtype=np.float64) - z) * s)
        return float(y.min()), float(y.max())
    return min(lo for lo, _ in lims), max(hi for _, hi in lims)   # cat


def deps(p: Plan, node: fx.Node) -> list[fx.Node] | None:
    """The nodes a planned op or its free quantize reads (None: not part of the plan)."""
    if node in p.elems:
        return p.elems[node].srcs
    if node in p.aliases:
        return [p.aliases[node]]
    return None


# ----------------------------------------------------------------------------- code
def lower(lw, qe: QElem) -> Val:
    """Emit the int8 kernel of planned op ``qe`` (``lw``: the ``Lowerer``)."""
    xs = [lw.contig(lw.val(s)) for s in qe.srcs]
    if any(x.dtype != "i8" for x in xs):
        raise Unsupported("int8 op input is not int8")
    node, p = qe.node, qe.p
    ys = _shape(node)
    zo = qe.out_q[1]
    name = ident(module_path(node) or node.name) + "_" + node.name
    op = "int8 " + op_name(node)
    f = "gr_int8_elementwise.c"
    if qe.kind == "add":
        a, b = xs
        y = lw.new(ys, "i8", inplace_of=a if b.buf is not a.buf else None)
        emit_add(lw, a, b, y, [z for _, z in qe.in_q], p["mult"], p["shift"], zo, -128, 127, name, op)
        return y
    if qe.kind == "mul":
        ai = p["a"]
        a, b = xs[ai], xs[1 - ai]
        y = lw.new(ys, "i8", inplace_of=a if b.buf is not a.buf else None)
        lw.emit("gr_mul_s8", f,
                f"gr_mul_s8({a.ptr()}, {qe.in_q[ai][1]}, {b.ptr()}, {qe.in_q[1 - ai][1]}, {y.out()}, {p['outer']}, "
                f"{p['inner']}, {p['b_inner']}, {p['mult']}, {p['shift']}, {zo}, -128, 127);", [a, b], [y], op=op)
        return y
    x = xs[0]
    if qe.kind == "view":   # the view handler, given the int8 tensor for the float one
        arg = node.args[0]
        saved = lw.vals.get(arg)
        lw.vals[arg] = x
        try:
            return HANDLERS[node.target](lw, node)
        finally:
            if saved is None:
                del lw.vals[arg]
            else:
                lw.vals[arg] = saved
    if qe.kind == "lut":
        table = lw.add_const(name + "_lut", p["table"], "i8")
        y = lw.new(ys, "i8", inplace_of=x)
        lw.emit("gr_lut_s8", f, f"gr_lut_s8({x.ptr()}, {y.out()}, {x.numel}, {table.name});", [x], [y], op=op)
        return y
    if qe.kind == "avg":
        mult = lw.add_const(name + "_mult", p["mult"], "i32")
        shift = lw.add_const(name + "_shift", p["shift"], "i32")
        y = lw.new(ys, "i8")
        pool_x = Val(x.buf, x.shape, x.strides, x.offset)
        s = pool_shape(pool_x, (0, 0, p["oh"], p["ow"]), p["k"], p["s"], p["pad"], (1, 1), p["cip"], p["div"])
        lw.emit("gr_avg_pool2d_s8", f,
                f"{{ {s}\n  gr_avg_pool2d_s8(&s, {x.ptr()}, {y.out()}, {qe.in_q[0][1]}, {zo}, {mult.name}, "
                f"{shift.name}); }}", [x], [y], op=op)
        return y
    y = lw.new(ys, "i8")
    if qe.kind == "cat":
        dim = p["dim"]
        outer, out_inner = numel(ys[:dim]), numel(ys[dim:])
        lines, offset = [], 0
        for i, (x, r) in enumerate(zip(xs, p["rescale"])):
            inner = numel(x.shape[dim:])
            lines.append(f"  {_rescale_struct(f'r{i}', qe.in_q[i], qe.out_q, r)}\n"
                         f"  gr_concat_s8({x.ptr()}, {outer}, {inner}, {out_inner}, {offset}, "
                         f"{'&r' + str(i) if r else 'NULL'}, {y.out()});")
            offset += inner
        lw.emit("gr_concat_s8", f, "{\n" + "\n".join(lines) + " }", xs, [y], op=op)
        return y
    top, bottom, left, right = p["pads"]
    xsh = x.shape
    outer, h, w = (numel(xsh[:-2]), xsh[-2], xsh[-1])
    r = p["rescale"]
    lw.emit("gr_pad_s8", f,
            f"{{ {_rescale_struct('r', qe.in_q[0], qe.out_q, r)}\n"
            f"  gr_pad_s8({x.ptr()}, {y.out()}, {outer}, {h}, {w}, {top}, {bottom}, {left}, {right}, "
            f"{p['value']}, {'&r' if r else 'NULL'}); }}", [x], [y], op=op)
    return y


def emit_add(lw, a: Val, b: Val, y: Val, zps, mult: np.ndarray, shift: np.ndarray, out_zp: int,
             act_min: int, act_max: int, name: str, op: str) -> None:
    """TFLite's int8 add (``int8_layers``' [out, a, b] multipliers) as ``gr_add_lut_s8``:
    each input's rescaled term requant((x - zp) << 20) tabulated over the 256 int8 values."""
    q = np.arange(-128, 128, dtype=np.int64)
    ta, tb = (lw.add_const(name + suffix, int8.requantize((q - int(z)) << int8.ADD_SHIFT, np.int64(m), np.int64(e))
                           .astype(np.int32), "i32")
              for suffix, z, m, e in (("_ta", zps[0], mult[1], shift[1]), ("_tb", zps[1], mult[2], shift[2])))
    lw.emit("gr_add_lut_s8", "gr_int8_elementwise.c",
            f"gr_add_lut_s8({a.ptr()}, {b.ptr()}, {y.out()}, {y.numel}, {ta.name}, {tb.name}, {int(mult[0])}, "
            f"{int(shift[0])}, {out_zp}, {act_min}, {act_max});", [a, b], [y], op=op)


def input_readers(node: fx.Node) -> list[fx.Node] | None:
    """The readers of float input ``node`` with its zero constant pads looked through
    (None: a pad of another kind). pad(quantize(x), zero point) == quantize(pad(x, 0))
    exactly, so when they all quantize alike the caller's int8 input is padded instead."""
    out = []
    for u in node.users:
        if u.target in PAD and u.args[0] is node:
            try:
                pads(u)
            except NotInt8:
                return None
            if pad_value(u) != 0.0 or not u.users:
                return None
            out += list(u.users)
        else:
            out.append(u)
    return out


def lower_input_pad(lw, node: fx.Node, x: Val, zp: int) -> Val:
    """``gr_pad_s8`` of the int8 model input ``x`` (zero pad ``node``) with its zero point."""
    top, bottom, left, right = pads(node)
    lw.current = node
    y = lw.new(_shape(node), "i8")
    lw.emit("gr_pad_s8", "gr_int8_elementwise.c",
            f"gr_pad_s8({x.ptr()}, {y.out()}, {numel(x.shape[:-2])}, {x.shape[-2]}, {x.shape[-1]}, {top}, "
            f"{bottom}, {left}, {right}, {zp}, NULL);", [x], [y], op="int8 " + op_name(node))
    return y


def _rescale_struct(var: str, in_q, out_q, r) -> str:
    if r is None:
        return ""
    return f"static const gr_rescale_s8 {var} = {{{in_q[1]}, {out_q[1]}, {r[0]}, {r[1]}}};"


__all__ = ["NotInt8", "Plan", "QElem", "plan", "deps", "lower", "emit_add", "input_readers", "lower_input_pad", "lut_table", "round_half_up", "VIEWS", "QDQ"]
