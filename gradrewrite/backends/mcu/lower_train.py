"""Lower a training-step graph (``rewrite/train_step.py``) to kernel calls.

The forward reuses the inference handlers of ``lower.py``; this module adds the loss,
the backward ops autograd emits for the layers the forward kernels cover, and the SGD
update. Trained parameters are not constants here: each one is a mutable array
(``TrainedBuf``, ``.data`` in SRAM) that the forward reads and the update writes in
place, in the order of the graph (the order the sparse-update reordering chose).
Frozen parameters stay constant-folded flash arrays, as in inference. A partially
trained parameter (sparse-update's channel ratio) is split: its first rows in SRAM,
the rest in flash (``SplitBuf``); convolutions and linear layers read the two parts
with two kernel calls, and any other op that would read it whole is refused.

The learning rate is a run-time argument of ``model_train_step``: the update
``sub(w, mul(g, lr))`` is matched and emitted as ``gr_sgd_f32(w, g, lr, n)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ...rewrite.graph import Graph, module_path, op_name
from ...rewrite.quant_ops import DEQUANTIZE_PER_TENSOR
from ...rewrite import int8_layers as int8
from . import lower_train_s8 as s8
from .lower import HANDLERS, Lowerer, Unsupported, _float_in, _ident, _shape, _val_meta
from .program import Buf, Program, Val, c_float, contiguous_strides, numel
from .train_int8 import (device_form, is_int8_step, linear_bwd_input, linear_bwd_weight, mask_bits,
                         masked_grad, ste_s8)

aten = torch.ops.aten
TRAIN_FILE = "gr_train.c"


@dataclass(eq=False)
class TrainedBuf(Buf):
    """A trained parameter: a non-const array in weights.c (SRAM), updated in place."""

    path: str = ""
    shape: tuple[int, ...] = ()         # the whole parameter's shape
    rows: int | None = None             # partial channels: only the first rows live here
    frozen_rows: Buf | None = None      # ... and the rest in this const (flash) array
    # int8 steps: the torch parameter = stored value * to_param_scale[row] (int32 biases
    # of int8 layers are stored in units of s_x * s_w); None: stored as the parameter
    to_param_scale: np.ndarray | None = None
    state: bool = False                 # optimizer state (a momentum buffer), not a parameter


@dataclass(eq=False)
class SplitBuf(Buf):
    """A partially trained parameter: its first ``rows`` filters in SRAM (``trained``), the
    rest in flash (``rest``). No kernel reads it whole: each reads the two parts."""

    trained: Val | None = None
    rest: Val | None = None
    rows: int = 0

    def expr(self) -> str:
        raise Unsupported(f"{self.name} is split into trained (SRAM) and frozen (flash) filters; "
                          "this op reads it whole")


@dataclass(eq=False)
class LabelBuf(Buf):
    """The labels: the caller's second pointer of ``model_train_step``."""

    def expr(self) -> str:
        return f"(label_bytes + {self.offset})"


@dataclass
class TrainProgram:
    program: Program             # every step of one training step; outputs = [loss]
    forward_steps: int           # steps[:forward_steps] compute the logits (model_run)
    logits: Val
    trained: list[TrainedBuf]    # in the graph's parameter order
    frozen: list[str] = field(default_factory=list)
    lr: float = 0.0              # the graph's learning rate (model_train_step takes its own)
    int8: bool = False           # an int8 step (QAS integer updates)
    rounding: str = "nearest"    # int8 updates: nearest | stochastic (xorshift32 from seed)
    seed: int = 0
    graph: Graph | None = None   # the graph lowered (an int8 step's device form)


class TrainLowerer(Lowerer):
    def __init__(self, graph: Graph):
        ts = graph.meta.get("train_step")
        if not ts:
            raise Unsupported("not a training-step graph")
        self.ts = ts
        self.int8 = is_int8_step(graph)
        if ts["optimizer"].get("momentum") and self.int8:
            raise Unsupported("SGD with momentum in an int8 training step (int8 steps use plain SGD with QAS)")
        if self.int8:  # the integers the device keeps (train_int8.py)
            graph = device_form(graph)
        qas = ts.get("qas") or {}
        self.rounding, self.seed = qas.get("rounding", "nearest"), int(qas.get("seed", 0))
        self.trained_attrs = {info["attr"]: path for path, info in ts["params"].items() if info.get("trained")}
        self._state_attrs = {f"{a}_momentum" for a in self.trained_attrs} if ts["optimizer"].get("momentum") else set()
        self._intercept: dict[str, Buf] = {}      # int8 layer const name -> its weight / bias buffer
        self._split_q: dict[str, tuple] = {}      # int8 layer name -> (rows, trained Val, rest Val)
        self._int_store: dict[str, tuple] = {}    # trained attr -> (dtype, per-row QAS factor of the storage)
        self.logits_val: Val | None = None
        self._raw_views = False                   # slicing an int8 activation keeps it int8
        # an int8 step takes its input as int8 (the runners quantize it on the host)
        super().__init__(graph, sparse=False, quantized_inputs=self.int8)
        self.trained: dict[str, TrainedBuf] = {}
        self.forward_steps: int | None = None
        self.logits_node: fx.Node | None = None
        self._labels_moved = False
        self._check_update_order()

    # trained parameters are run-time values, not constants
    def is_const(self, node: Any) -> bool:
        if isinstance(node, fx.Node) and node.op == "get_attr" and (node.target in self.trained_attrs
                                                                  or node.target in self._state_attrs):
            return False
        return super().is_const(node)

    def _dead_after_patterns(self) -> set[fx.Node]:
        skip = super()._dead_after_patterns()
        for n in self.graph.gm.graph.nodes:  # mul(g, lr) (and QAS factors) folded into the SGD kernel
            chain = _update_chain(n)
            if chain is not None:
                skip.update(chain[3])
            if _momentum_parts(n) is not None:  # mul(v, momentum) folded into the momentum kernel
                skip.add(n.args[0])
        return skip

    # ------------------------------------------------------------ int8 steps
    def add_const(self, name: str, array: np.ndarray, dtype: str) -> Buf:
        buf = self._intercept.get(name)
        return buf if buf is not None else super().add_const(name, array, dtype)

    def val(self, node: Any) -> Val:
        v = super().val(node)
        if isinstance(v, Val) and isinstance(v.buf, s8.DqBuf) and not self._raw_views:  # a reader that needs floats
            return s8.materialize(self, v)
        return v

    def _momentum_buffers(self) -> None:
        """SGD momentum: one SRAM array per trained parameter (its trained rows), zero at
        first, updated in place; read back like a parameter (path ``<param>_momentum``)."""
        attrs = self._attr_nodes
        for path, info in self.ts["params"].items():
            mom_attr = f"{info['attr']}_momentum"
            if not info.get("trained") or not info.get("momentum") or mom_attr not in attrs:
                continue
            shape = tuple(info["shape"])
            rows = info.get("rows")
            rows = rows if rows is not None and rows < shape[0] else None
            n = numel(((rows or shape[0]), *shape[1:]))
            buf = TrainedBuf(self._unique("m_" + info["attr"]), "const", n * 4, "f32", data=np.zeros(n, np.float32),
                             path=f"{path}_momentum", shape=shape, rows=rows, state=True)
            self.trained[mom_attr] = buf
            self.vals[attrs[mom_attr]] = Val(buf, shape, contiguous_strides(shape))

    def _int8_buffers(self) -> None:
        """The int8 layers' weights (int8) and biases (int32): SRAM arrays when trained (a
        partially trained weight split), flash otherwise; the forward kernels get them
        through add_const, the backward and the updates through vals."""
        wmap = self.graph.meta.get("int8_train", {}).get("weights", {})
        attrs = self._attr_nodes
        for ql in self.qlayers.values():
            if ql.kind not in ("conv", "linear"):
                continue
            name = _ident(module_path(ql.layer) or ql.layer.name)
            wq_attr = wmap.get(str(ql.layer.args[1].args[0].target))
            x_scale = float(ql.x.args[1])
            w = ql.weight.numpy()
            shape = tuple(w.shape)
            flat = w.reshape(shape[0], -1)
            path = self.trained_attrs.get(wq_attr)
            if path is None:
                buf = Lowerer.add_const(self, name + "_w", w.reshape(-1).copy(), "i8")
                val = Val(buf, shape, contiguous_strides(shape))
                parts = ((0, val),)
            else:
                rows = self.ts["params"][path].get("rows")
                rows = rows if rows is not None and rows < shape[0] else None
                n_tr = rows or shape[0]
                buf = TrainedBuf(self._unique("p_" + wq_attr), "const", n_tr * flat.shape[1], "i8",
                                 data=flat[:n_tr].reshape(-1).copy(), path=path, shape=shape, rows=rows)
                self.trained[wq_attr] = buf
                tshape = (n_tr, *shape[1:])
                tval = Val(buf, tshape, contiguous_strides(tshape))
                parts = ((0, tval),)
                if rows is not None:
                    rest = Lowerer.add_const(self, wq_attr + "_frozen_rows", flat[rows:].reshape(-1).copy(), "i8")
                    buf.frozen_rows = rest
                    rshape = (shape[0] - rows, *shape[1:])
                    rval = Val(rest, rshape, contiguous_strides(rshape))
                    parts = ((0, tval), (rows, rval))
                    self._split_q[name] = (rows, tval, rval)
                    split = SplitBuf(self._unique("split_" + wq_attr), "split", flat.size, "i8",
                                     trained=tval, rest=rval, rows=rows)
                    val = Val(split, shape, contiguous_strides(shape))
                else:
                    val = tval
                self._int_store[wq_attr] = ("i8", np.ones(shape[0]))  # the chain already holds s * s^-2
            self._intercept[name + "_w"] = val.buf if not isinstance(val.buf, SplitBuf) else val.buf.trained.buf
            if wq_attr in attrs:
                self.vals[attrs[wq_attr]] = val
                scale = Lowerer.add_const(self, name + "_wscale", ql.w_scales.astype(np.float32), "f32")
                self._scaled[wq_attr] = s8.ScaledS8(self._unique(name + "_ws8"), "scaled", 0, "f32",
                                                    parts=parts, scale=scale, channels=shape[0])
            b_node = ql.layer.args[2] if len(ql.layer.args) > 2 else None
            bpath = self.trained_attrs.get(str(b_node.target)) if isinstance(b_node, fx.Node) else None
            if bpath is not None:
                sb = x_scale * ql.w_scales
                bbuf = TrainedBuf(self._unique("p_" + str(b_node.target)), "const", ql.bias_q.nbytes, "i32",
                                  data=ql.bias_q.copy(), path=bpath, shape=tuple(ql.bias_q.shape),
                                  to_param_scale=sb)
                self.trained[str(b_node.target)] = bbuf
                self._intercept[name + "_bias_q"] = bbuf
                self.vals[b_node] = Val(bbuf, bbuf.shape, (1,))
                self._int_store[str(b_node.target)] = ("i32", 1.0 / sb)

    def _qmac(self, ql: int8.QLayer, x: Val, y: Val, out_shape: tuple[int, ...]) -> None:
        name = _ident(module_path(ql.layer) or ql.layer.name)
        if name not in self._split_q:
            return super()._qmac(ql, x, y, out_shape)
        rows, tval, rval = self._split_q[name]
        mult = Lowerer.add_const(self, name + "_mult", ql.mult, "i32")
        shift = Lowerer.add_const(self, name + "_shift", ql.shift, "i32")
        bias = self.add_const(name + "_bias_q", ql.bias_q, "i32")
        op = "int8 " + op_name(ql.layer) + ("+" + op_name(ql.act) if ql.act is not None else "") + " (split weight)"
        self.current = ql.layer
        code = []
        if ql.kind == "linear":
            k, n_out = int(ql.weight.shape[1]), int(ql.weight.shape[0])
            n_rows = x.numel // k
            for o0, part in ((0, tval), (rows, rval)):
                m = part.shape[0]
                code.append(f"{{ static const gr_quant_params q = {{{ql.in_zp}, {ql.out_zp}, {ql.act_min}, "
                            f"{ql.act_max}, {mult.name} + {o0}, {shift.name} + {o0}}};")
                for r in range(n_rows):
                    xr = Val(x.buf, (k,), (1,), x.offset + r * k)
                    yr = Val(y.buf, (m,), (1,), y.offset + r * n_out + o0)
                    code.append(f"  gr_linear_s8(&q, {xr.ptr()}, {part.ptr()}, {bias.name} + {o0}, {yr.out()}, "
                                f"1, {k}, {m});")
                code.append("}")
            self.emit("gr_linear_s8", "gr_int8.c", "\n".join(code), [x, tval, rval], [y],
                      n_rows * k * n_out, op=op)
            return
        n, cin, h, w_ = x.shape
        oc, oh, ow = out_shape[1:]
        dw = ql.conv["groups"] > 1
        if dw and ql.conv["groups"] != cin:
            raise Unsupported("a partially trained grouped (not depthwise) int8 convolution")
        macs = 0
        for o0, part in ((0, tval), (rows, rval)):
            k = part.shape[0]
            ic0, ic, groups = (o0, k, k) if dw else (0, cin, 1)
            s, m = self._conv_shape((1, ic, h, w_), part.shape, (1, k, oh, ow), {**ql.conv, "groups": groups})
            macs += m * n
            code.append(f"{{ {s} static const gr_quant_params q = {{{ql.in_zp}, {ql.out_zp}, {ql.act_min}, "
                        f"{ql.act_max}, {mult.name} + {o0}, {shift.name} + {o0}}};")
            for i in range(n):
                xi = Val(x.buf, (ic, h, w_), (h * w_, w_, 1), x.offset + (i * cin + ic0) * h * w_)
                yi = Val(y.buf, (k, oh, ow), (oh * ow, ow, 1), y.offset + (i * oc + o0) * oh * ow)
                code.append(f"  gr_conv2d_s8(&s, &q, {xi.ptr()}, {part.ptr()}, {bias.name} + {o0}, {yi.out()});")
            code.append("}")
        self.emit("gr_conv2d_s8", "gr_int8.c", "\n".join(code), [x, tval, rval], [y], macs, op=op)

    def _check_update_order(self) -> None:
        """An in-place update must come after every other read of its parameter."""
        order = {n: i for i, n in enumerate(self.graph.gm.graph.nodes)}
        for n in self.graph.gm.graph.nodes:
            attr = n.meta.get("custom", {}).get("writes")
            if n.op != "call_function" or attr is None or n.target != aten.sub.Tensor:
                continue
            w = next(a for a in self.graph.gm.graph.nodes if a.op == "get_attr" and a.target == attr)
            for reader in _readers(w):
                if order[reader] > order[n] and reader.meta.get("custom", {}).get("train_role") != "update":
                    raise Unsupported(f"{attr} is read by {reader.name} after its in-place update")

    def run(self) -> Program:
        self._scaled: dict[str, s8.ScaledS8] = {}
        self._attr_nodes = {str(n.target): n for n in self.graph.gm.graph.nodes if n.op == "get_attr"}
        if self.int8:
            self._int8_buffers()
        self._momentum_buffers()
        for node in self.graph.gm.graph.nodes:
            if node.op == "get_attr" and node.target in self.trained_attrs and node.target not in self.trained:
                t = self.graph.attr(node).detach().float().contiguous()
                path = self.trained_attrs[node.target]
                shape = tuple(t.shape)
                rows = self.ts["params"][path].get("rows")
                rows = rows if rows is not None and rows < shape[0] else None
                flat = t.numpy().reshape(shape[0], -1)
                arr = (flat if rows is None else flat[:rows]).reshape(-1).copy()
                buf = TrainedBuf(self._unique("p_" + node.target), "const", arr.nbytes, "f32", data=arr,
                                 path=path, shape=shape, rows=rows)
                self.trained[node.target] = buf
                if rows is None:
                    self.vals[node] = Val(buf, shape, contiguous_strides(shape))
                    continue
                tshape, rshape = (rows, *shape[1:]), (shape[0] - rows, *shape[1:])
                rest = self.add_const(node.target + "_frozen_rows", flat[rows:].reshape(-1).copy(), "f32")
                buf.frozen_rows = rest
                split = SplitBuf(self._unique("split_" + node.target), "split", t.numel() * 4, "f32",
                                 trained=Val(buf, tshape, contiguous_strides(tshape)),
                                 rest=Val(rest, rshape, contiguous_strides(rshape)), rows=rows)
                self.vals[node] = Val(split, shape, contiguous_strides(shape))
        return super().run()

    def _lower(self, node: fx.Node) -> None:
        if not self._labels_moved:  # placeholders come first: the labels get their own pointer
            self._labels_moved = True
            phs = [n for n in self.graph.gm.graph.nodes if n.op == "placeholder"]
            if len(phs) != 2:
                raise Unsupported(f"the training step has {len(phs)} inputs; one input and its labels are supported")
            v = self.vals[phs[-1]]  # the model's inputs come first, then the labels
            v.buf = LabelBuf(v.buf.name, "input", v.buf.nbytes, v.buf.dtype, offset=0)
        role = node.meta.get("custom", {}).get("train_role")
        if self.forward_steps is None and role in ("loss", "backward"):
            self.logits_node = next(iter(self.graph.gm.graph.find_nodes(
                op="call_function", target=aten._log_softmax.default)), None)
            if self.logits_node is not None:  # model_run's output: float logits, written in the forward
                self.current = self.logits_node
                self.logits_val = self.val(self.logits_node.args[0])
                self.vals[self.logits_node.args[0]] = self.logits_val  # one float copy
            self.forward_steps = len(self.steps)
        handler = TRAIN_HANDLERS.get(node.target)
        if handler is None:
            return super()._lower(node)
        try:
            self.vals[node] = handler(self, node)
        except Unsupported as exc:
            raise Unsupported(f"{op_name(node)} at {module_path(node) or '<root>'}: {exc}") from None


def _readers(node: fx.Node) -> list[fx.Node]:
    """Nodes reading ``node``'s storage, through views."""
    views = {aten.slice.Tensor, aten.permute.default, aten.t.default, aten.view.default,
             aten.expand.default, aten.transpose.int}
    out, stack = [], list(node.users)
    while stack:
        u = stack.pop()
        if u.target in views:
            stack.extend(u.users)
        else:
            out.append(u)
    return out


def _update_chain(node: fx.Node) -> tuple | None:
    """``sub(w, mul(mul(...mul(g, c1)..., ck), lr))`` that writes a parameter ->
    (w, g, [c1..ck constant factor nodes], [the muls], lr); plain SGD has no factors,
    QAS on an int8 weight has two (the chain rule's s and QAS's s^-2)."""
    if node.op != "call_function" or node.target != aten.sub.Tensor:
        return None
    if not node.meta.get("custom", {}).get("writes"):
        return None
    w, scaled = node.args[:2]
    if not (isinstance(scaled, fx.Node) and scaled.target == aten.mul.Tensor and len(scaled.users) == 1
            and isinstance(scaled.args[0], fx.Node) and not isinstance(scaled.args[1], fx.Node)):
        return None
    muls, factors, g = [scaled], [], scaled.args[0]
    while g.target == aten.mul.Tensor and len(g.users) == 1 and isinstance(g.args[1], fx.Node) \
            and g.args[1].op == "get_attr" and isinstance(g.args[0], fx.Node):
        factors.append(g.args[1])
        muls.append(g)
        g = g.args[0]
    return w, g, factors, muls, float(scaled.args[1])


def _momentum_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """``add(mul(v, momentum), g)`` that writes a momentum buffer -> (v, g, momentum)."""
    if node.op != "call_function" or node.target != aten.add.Tensor:
        return None
    if not str(node.meta.get("custom", {}).get("writes", "")).endswith("_momentum"):
        return None
    scaled, g = node.args[:2]
    if not (isinstance(scaled, fx.Node) and scaled.target == aten.mul.Tensor and len(scaled.users) == 1
            and not isinstance(scaled.args[1], fx.Node)):
        return None
    return scaled.args[0], g, float(scaled.args[1])


def update_factor(graph: Graph, factors: list[fx.Node], storage: np.ndarray, rows: int) -> np.ndarray:
    """The per-row float32 factor f of an integer update (delta = lr * (g * f[row])): the
    chain's constant factors times the storage's, multiplied in float64."""
    f = np.asarray(storage, np.float64).reshape(-1)[:rows].copy()
    for node in factors:
        t = graph.attr(node).detach().double().reshape(-1).numpy()
        f *= t[0] if t.size == 1 else t[:rows]
    return f.astype(np.float32)


def _param_attr(node: Any) -> str | None:
    while isinstance(node, fx.Node) and node.target == aten.slice.Tensor:
        node = node.args[0]
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


TRAIN_HANDLERS: dict[Any, Any] = {}


def train_handles(*targets):
    def deco(fn):
        for t in targets:
            TRAIN_HANDLERS[t] = fn
        return fn
    return deco


def _emit(lw: TrainLowerer, kernel: str, code: str, reads: list[Val], writes: list[Val], macs: int = 0) -> None:
    lw.emit(kernel, TRAIN_FILE, code, reads, writes, macs)
    lw.kernel_files.add("gr_train.h")


def _prefix(v: Val) -> Val:
    """A view that is a contiguous run of its buffer (e.g. the first rows)."""
    if not v.is_contiguous():
        raise Unsupported("the update target is not a contiguous block of its parameter")
    return v


# ------------------------------------------------------------------ forward with trained weights
@train_handles(aten.convolution.default)
def _conv(lw: TrainLowerer, node: fx.Node) -> Val:
    w_node = node.args[1]
    b_node = node.args[2]
    if lw.is_const(w_node) and (b_node is None or lw.is_const(b_node)):
        return HANDLERS[node.target](lw, node)
    c = int8._conv_params(node)
    if c is None:
        raise Unsupported("transposed convolution")
    x = _float_in(lw, node.args[0])
    wv = lw.val(w_node)
    b = lw.contig(lw.val(b_node)) if b_node is not None else None
    ys = _shape(node)
    if isinstance(wv.buf, SplitBuf):
        return _conv_split(lw, node, x, wv.buf, b, ys, c)
    w = lw.contig(wv)
    y = lw.new(ys, "f32")
    s, macs = Lowerer._conv_shape(x.shape, w.shape, ys, c)
    code = (f"{{ {s}\n  gr_conv2d_f32(&s, {x.ptr()}, {w.ptr()}, {b.ptr() if b else 'NULL'}, {y.out()}, "
            f"@lo@, @hi@); }}")
    step = lw.emit("gr_conv2d_f32", "gr_conv.c", code, [x, w] + ([b] if b else []), [y], macs,
                   params={"lo": -np.inf, "hi": np.inf})
    lw._fusable[node] = step
    return y


def _parts(split: SplitBuf, c: dict, cin: int):
    """(first output channel, weight part, first input channel, input channels, groups) per part."""
    dw = c["groups"] > 1
    if dw and not (c["groups"] == cin == split.rows + split.rest.shape[0]):
        raise Unsupported("a partially trained grouped (not depthwise) convolution")
    for oc0, part in ((0, split.trained), (split.rows, split.rest)):
        k = part.shape[0]
        yield oc0, part, (oc0 if dw else 0), (k if dw else cin), (k if dw else 1)


def _conv_split(lw: TrainLowerer, node: fx.Node, x: Val, split: SplitBuf, b: Val | None, ys, c) -> Val:
    """Trained filters from SRAM, frozen ones from flash: per image, two conv calls
    writing the two channel ranges of the output (one step, so an activation fuses)."""
    n, cin, h, w_ = x.shape
    oc, oh, ow = ys[1:]
    y = lw.new(ys, "f32")
    code, macs = [], 0
    for oc0, part, ic0, ic, groups in _parts(split, c, cin):
        k = part.shape[0]
        s, m = Lowerer._conv_shape((1, ic, h, w_), part.shape, (1, k, oh, ow), {**c, "groups": groups})
        macs += m * n
        bptr = Val(b.buf, (k,), (1,), b.offset + oc0).ptr() if b is not None else "NULL"
        code.append(f"{{ {s}")
        for i in range(n):
            xi = Val(x.buf, (ic, h, w_), (h * w_, w_, 1), x.offset + (i * cin + ic0) * h * w_)
            yi = Val(y.buf, (k, oh, ow), (oh * ow, ow, 1), y.offset + (i * oc + oc0) * oh * ow)
            code.append(f"  gr_conv2d_f32(&s, {xi.ptr()}, {part.ptr()}, {bptr}, {yi.out()}, @lo@, @hi@);")
        code.append("}")
    reads = [x, split.trained, split.rest] + ([b] if b is not None else [])
    step = lw.emit("gr_conv2d_f32", "gr_conv.c", "\n".join(code), reads, [y], macs,
                   params={"lo": -np.inf, "hi": np.inf}, op=op_name(node) + " (split weight)")
    lw._fusable[node] = step
    return y


@train_handles(aten.slice.Tensor)
def _slice(lw: TrainLowerer, node: fx.Node) -> Val:
    """Leading rows of a split parameter are its trained part."""
    if s8.dq_of(lw, node.args[0]) is not None:
        lw._raw_views = True
        try:
            return HANDLERS[node.target](lw, node)
        finally:
            lw._raw_views = False
    v = lw.val(node.args[0])
    if not isinstance(v.buf, SplitBuf):
        return HANDLERS[node.target](lw, node)
    a = list(node.args) + [None] * 5
    shape = _shape(node)
    if int(a[1] or 0) != 0 or int(a[2] or 0) != 0 or int(a[4] or 1) != 1 or shape[0] > v.buf.rows:
        raise Unsupported("a slice beyond the trained rows of a partially trained parameter")
    t = v.buf.trained
    return Val(t.buf, shape, t.strides, t.offset)


@train_handles(aten.addmm.default)
def _addmm(lw: TrainLowerer, node: fx.Node) -> Val:
    b_node, x_node, wt_node = node.args[:3]
    if lw.is_const(wt_node) and lw.is_const(b_node):
        return HANDLERS[node.target](lw, node)
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        raise Unsupported("addmm with alpha/beta")
    x = _float_in(lw, x_node)
    wt = lw.val(wt_node)  # (k, n_out): usually permute(weight)
    b = lw.contig(lw.val(b_node))
    if isinstance(wt.buf, SplitBuf):
        return _linear_split(lw, node, x, wt.buf, b)
    w = lw.contig(Val(wt.buf, (wt.shape[1], wt.shape[0]), (wt.strides[1], wt.strides[0]), wt.offset))
    n_out, k = w.shape
    rows = x.numel // k
    y = lw.new(_shape(node), "f32")
    code = f"gr_linear_f32({x.ptr()}, {w.ptr()}, {b.ptr()}, {y.out()}, {rows}, {k}, {n_out}, @lo@, @hi@);"
    step = lw.emit("gr_linear_f32", "gr_linalg.c", code, [x, w, b], [y], rows * k * n_out,
                   params={"lo": -np.inf, "hi": np.inf})
    lw._fusable[node] = step
    return y


def _linear_split(lw: TrainLowerer, node: fx.Node, x: Val, split: SplitBuf, b: Val) -> Val:
    """Trained output rows from SRAM, the rest from flash: per input row, two calls."""
    ys = _shape(node)
    n_out, k = ys[-1], x.shape[-1]
    rows = x.numel // k
    if split.trained.shape[1:] != (k,):
        raise Unsupported("the split weight is not the (out, in) weight of this linear layer")
    y = lw.new(ys, "f32")
    code = []
    for r in range(rows):
        for o0, part in ((0, split.trained), (split.rows, split.rest)):
            m = part.shape[0]
            xr = Val(x.buf, (k,), (1,), x.offset + r * k)
            yr = Val(y.buf, (m,), (1,), y.offset + r * n_out + o0)
            br = Val(b.buf, (m,), (1,), b.offset + o0)
            code.append(f"gr_linear_f32({xr.ptr()}, {part.ptr()}, {br.ptr()}, {yr.out()}, 1, {k}, {m}, @lo@, @hi@);")
    step = lw.emit("gr_linear_f32", "gr_linalg.c", "\n".join(code), [x, split.trained, split.rest, b], [y],
                   rows * k * n_out, params={"lo": -np.inf, "hi": np.inf}, op=op_name(node) + " (split weight)")
    lw._fusable[node] = step
    return y


# ------------------------------------------------------------------ loss
@train_handles(aten.nll_loss_forward.default)
def _nll(lw: TrainLowerer, node: fx.Node) -> tuple:
    logp_node, target_node, weight, reduction, ignore = (list(node.args) + [None] * 5)[:5]
    if weight is not None or int(reduction) not in (1, 2):
        raise Unsupported("class weights or reduction='none'")
    logp, target = _float_in(lw, logp_node), lw.contig(lw.val(target_node))
    if target.dtype != "i64" or len(logp.shape) != 2:
        raise Unsupported("cross-entropy needs (batch, classes) scores and int64 labels")
    loss, tw = lw.new((), "f32", name="loss"), lw.new((), "f32", name="total_weight")
    n, c = logp.shape
    _emit(lw, "gr_nll_loss_f32", f"gr_nll_loss_f32({logp.ptr()}, {target.ptr()}, {loss.out()}, {tw.out()}, "
          f"{n}, {c}, {int(ignore)}, {int(int(reduction) == 1)});", [logp, target], [loss, tw])
    return (loss, tw)


@train_handles(aten.ones_like.default)
def _ones_like(lw: TrainLowerer, node: fx.Node) -> Val:
    shape = _shape(node)
    buf = lw.add_const(node.name, np.ones(max(1, numel(shape)), np.float32), "f32")
    return Val(buf, shape, contiguous_strides(shape))


@train_handles(aten.nll_loss_backward.default)
def _nll_bwd(lw: TrainLowerer, node: fx.Node) -> Val:
    g_node, logp_node, target_node, weight, reduction, ignore, tw_node = node.args[:7]
    if weight is not None or int(reduction) not in (1, 2):
        raise Unsupported("class weights or reduction='none'")
    g, target, tw = lw.contig(lw.val(g_node)), lw.contig(lw.val(target_node)), lw.contig(lw.val(tw_node))
    n, c = _shape(node)
    gx = lw.new((n, c), "f32")
    _emit(lw, "gr_nll_loss_bwd_f32", f"gr_nll_loss_bwd_f32({g.ptr()}, {target.ptr()}, {tw.ptr()}, {gx.out()}, "
          f"{n}, {c}, {int(ignore)}, {int(int(reduction) == 1)});", [g, target, tw], [gx])
    return gx


@train_handles(aten._log_softmax_backward_data.default)
def _log_softmax_bwd(lw: TrainLowerer, node: fx.Node) -> Val:
    g, out = _float_in(lw, node.args[0]), _float_in(lw, node.args[1])
    if int(node.args[2]) % len(g.shape) != len(g.shape) - 1:
        raise Unsupported("log-softmax over a dimension other than the last")
    cols = g.shape[-1]
    gx = lw.new(g.shape, "f32")
    _emit(lw, "gr_log_softmax_bwd_f32", f"gr_log_softmax_bwd_f32({g.ptr()}, {out.ptr()}, {gx.out()}, "
          f"{g.numel // cols}, {cols});", [g, out], [gx])
    return gx


# ------------------------------------------------------------------ backward
@train_handles(aten.threshold_backward.default, aten.hardtanh_backward.default)
def _act_bwd(lw: TrainLowerer, node: fx.Node) -> Val:
    """relu (threshold) / relu6 (hardtanh) backward: gx = gy where the forward value
    passed; reading an int8 output, the int8 kernels (lower_train_s8)."""
    d = s8.dq_of(lw, node.args[1])
    if d is not None:
        return s8.act_bwd(lw, node, d)
    g, y = _float_in(lw, node.args[0]), _float_in(lw, node.args[1])
    gx = lw.new(g.shape, "f32", inplace_of=g)
    bounds = ", ".join(c_float(float(b)) for b in node.args[2:])   # threshold, or lo and hi
    kernel = "gr_threshold_bwd_f32" if node.target == aten.threshold_backward.default else "gr_hardtanh_bwd_f32"
    _emit(lw, kernel, f"{kernel}({g.ptr()}, {y.ptr()}, {bounds}, {gx.out()}, {g.numel});", [g, y], [gx])
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
    gy = _float_in(lw, a[0])
    if s8.scaled_of(lw, a[2]) is not None or s8.dq_of(lw, a[1]) is not None:
        return s8.conv_bwd(lw, node, c, mask, gy)
    xs = tuple(_val_meta(a[1]).shape)
    ws = tuple(_val_meta(a[2]).shape)
    k = gy.shape[1]
    s, macs = Lowerer._conv_shape(xs, ws, gy.shape, c)
    outs: list[Val | None] = [None, None, None]
    if mask[0]:
        wv = lw.val(a[2])
        gx = lw.new(xs, "f32", name=node.name + "_gx")
        if isinstance(wv.buf, SplitBuf):
            _conv_bwd_input_split(lw, gy, wv.buf, gx, c)
        else:
            w = lw.contig(wv)
            _emit(lw, "gr_conv2d_bwd_input_f32", f"{{ {s}\n  gr_conv2d_bwd_input_f32(&s, {gy.ptr()}, "
                  f"{w.ptr()}, {gx.out()}); }}", [gy, w], [gx], macs)
        outs[0] = gx
    if mask[1]:
        x = _float_in(lw, a[1])
        gw = lw.new(ws, "f32", name=node.name + "_gw")
        _emit(lw, "gr_conv2d_bwd_weight_f32", f"{{ {s}\n  gr_conv2d_bwd_weight_f32(&s, {k}, {gy.ptr()}, "
              f"{x.ptr()}, {gw.out()}); }}", [gy, x], [gw], macs)
        outs[1] = gw
    if mask[2]:
        gb = lw.new((k,), "f32", name=node.name + "_gb")
        _emit(lw, "gr_conv2d_bwd_bias_f32", f"gr_conv2d_bwd_bias_f32({gy.shape[0]}, {k}, "
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
    for j, (oc0, part, ic0, ic, groups) in enumerate(_parts(split, c, cin)):
        k = part.shape[0]
        s, _ = Lowerer._conv_shape((1, ic, h, w_), part.shape, (1, k, oh, ow), {**c, "groups": groups})
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
    from .lower import _pair, _pool_shape
    if all(u.args[1] == 0 for u in node.users):
        return HANDLERS[node.target](lw, node)
    a = list(node.args) + [None] * 6
    x = _float_in(lw, a[0])
    if len(x.shape) != 4 or a[5]:
        raise Unsupported("only NCHW pooling without ceil_mode")
    k = _pair(a[1])
    s = _pair(a[2]) if a[2] else k
    p, d = _pair(a[3] or 0), _pair(a[4] or 1)
    ys = tuple(int(v) for v in node.meta["val"][0].shape)
    y, idx = lw.new(ys, "f32"), lw.new(ys, "i64", name=node.name + "_idx")
    _emit(lw, "gr_max_pool2d_idx_f32", f"{{ {_pool_shape(x, ys, k, s, p, d)}\n"
          f"  gr_max_pool2d_idx_f32(&s, {x.ptr()}, {y.out()}, {idx.out()}); }}", [x], [y, idx])
    return (y, idx)


@train_handles(aten.max_pool2d_with_indices_backward.default)
def _max_pool_bwd(lw: TrainLowerer, node: fx.Node) -> Val:
    g, idx = _float_in(lw, node.args[0]), lw.contig(lw.val(node.args[7]))
    xs = tuple(_val_meta(node.args[1]).shape)
    gx = lw.new(xs, "f32")
    _emit(lw, "gr_max_pool2d_bwd_f32", f"gr_max_pool2d_bwd_f32({g.ptr()}, {idx.ptr()}, {gx.out()}, "
          f"{xs[0] * xs[1]}, {xs[2] * xs[3]}, {g.shape[2] * g.shape[3]});", [g, idx], [gx])
    return gx


@train_handles(aten.avg_pool2d_backward.default)
def _avg_pool_bwd(lw: TrainLowerer, node: fx.Node) -> Val:
    from .lower import _pair, _pool_shape
    a = list(node.args) + [None] * 8
    g = _float_in(lw, a[0])
    xs = tuple(_val_meta(a[1]).shape)
    k = _pair(a[2])
    s = _pair(a[3]) if a[3] else k
    p = _pair(a[4] or 0)
    if a[5]:
        raise Unsupported("average pooling with ceil_mode")
    cip, div = int(bool(a[6])), int(a[7] or 0)
    gx = lw.new(xs, "f32")
    _emit(lw, "gr_avg_pool2d_bwd_f32", f"{{ {_pool_shape(gx, g.shape, k, s, p, (1, 1), cip, div)}\n"
          f"  gr_avg_pool2d_bwd_f32(&s, {g.ptr()}, {gx.out()}); }}", [g], [gx])
    return gx


@train_handles(aten._adaptive_avg_pool2d_backward.default)
def _adaptive_avg_bwd(lw: TrainLowerer, node: fx.Node) -> Val:
    g = _float_in(lw, node.args[0])
    xs = tuple(_val_meta(node.args[1]).shape)
    gx = lw.new(xs, "f32")
    _emit(lw, "gr_adaptive_avg_pool2d_bwd_f32", f"gr_adaptive_avg_pool2d_bwd_f32({g.ptr()}, {gx.out()}, "
          f"{xs[0] * xs[1]}, {xs[2]}, {xs[3]}, {g.shape[2]}, {g.shape[3]});", [g], [gx])
    return gx


# ------------------------------------------------------------------ update
@train_handles(aten.sub.Tensor)
def _sub(lw: TrainLowerer, node: fx.Node) -> Val:
    chain = _update_chain(node)
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
    store = lw._int_store.get(_param_attr(w_node) or "")
    if store is not None:  # an int8 weight / int32 bias: QAS, rounding, saturation
        rows = w.shape[0] if w.shape else 1
        s8.sgd_int(lw, w, g, update_factor(lw.graph, factors, store[1], rows), store[0], rows)
        return w
    if factors:
        raise Unsupported("the update is scaled by more than the learning rate (QAS needs an int8 weight)")
    _emit(lw, "gr_sgd_f32", f"gr_sgd_f32({w.out()}, {g.ptr()}, lr, {w.numel});", [w, g], [w])
    return w


@train_handles(aten.add.Tensor)
def _add(lw: TrainLowerer, node: fx.Node) -> Val:
    """The momentum buffer's update v = momentum * v + g, in place."""
    parts = _momentum_parts(node)
    if parts is None:
        return HANDLERS[node.target](lw, node)
    v_node, g_node, momentum = parts
    v, g = _prefix(lw.val(v_node)), lw.contig(lw.val(g_node))
    if not isinstance(v.buf, TrainedBuf) or g.numel != v.numel:
        raise Unsupported("a momentum update of another shape")
    _emit(lw, "gr_momentum_f32", f"gr_momentum_f32({v.out()}, {g.ptr()}, {c_float(momentum)}, {v.numel});",
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


# ------------------------------------------------------------------ int8 steps (lower_train_s8.py)
@train_handles(DEQUANTIZE_PER_TENSOR)
def _dq(lw: TrainLowerer, node: fx.Node) -> Val:
    if not lw.int8:
        return HANDLERS[node.target](lw, node)
    return s8.dequantize_marker(lw, node)


@train_handles(aten.mul.Tensor)
def _mul(lw: TrainLowerer, node: fx.Node) -> Val:
    a = node.args[0]
    if lw.int8 and isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target) in lw._scaled:
        buf = lw._scaled[str(a.target)]
        shape = _shape(node)
        return Val(buf, shape, contiguous_strides(shape))
    return HANDLERS[node.target](lw, node)


# the device form's own ops (train_int8.py)
TRAIN_HANDLERS.update({ste_s8: s8.ste, mask_bits: s8.mask_bits, masked_grad: s8.masked_grad,
                       linear_bwd_input: s8.linear_bwd_input, linear_bwd_weight: s8.linear_bwd_weight})


@train_handles(aten._log_softmax.default)
def _log_softmax(lw: TrainLowerer, node: fx.Node) -> Val:
    """The training step's log-softmax: gr_expf / gr_logf (reproducible by the reference)."""
    x = _float_in(lw, node.args[0])
    if int(node.args[1]) % len(x.shape) != len(x.shape) - 1 or node.args[2]:
        raise Unsupported("log-softmax over a dimension other than the last")
    cols = x.shape[-1]
    y = lw.new(x.shape, "f32")
    _emit(lw, "gr_log_softmax_tr_f32", f"gr_log_softmax_tr_f32({x.ptr()}, {y.out()}, {x.numel // cols}, {cols});",
          [x], [y])
    return y


def lower_train(graph: Graph) -> TrainProgram:
    """The training step as kernel calls; raises ``Unsupported`` at the first op it cannot generate."""
    lw = TrainLowerer(graph)
    prog = lw.run()
    loss_name = lw.ts["loss"]
    out_node = next(n for n in lw.graph.gm.graph.nodes if n.op == "output")
    loss_node = next(n for n in out_node.args[0] if isinstance(n, fx.Node) and n.name == loss_name)
    if lw.forward_steps is None or lw.logits_node is None:
        raise Unsupported("the training step has no log-softmax cross-entropy loss (use --loss cross_entropy)")
    logits = lw.logits_val if lw.logits_val is not None else lw.vals[lw.logits_node.args[0]]
    prog.outputs = [lw.vals[loss_node]]
    frozen = [p for p, info in lw.ts["params"].items() if not info.get("trained")]
    return TrainProgram(prog, lw.forward_steps, logits, list(lw.trained.values()), frozen,
                        float(lw.ts["optimizer"]["lr"]), lw.int8, lw.rounding, lw.seed, lw.graph)
