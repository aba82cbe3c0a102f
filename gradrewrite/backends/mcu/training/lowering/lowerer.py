"""``TrainLowerer``: the inference ``Lowerer`` extended to a training-step graph.

Trained parameters are not constants here: each one is a mutable array
(``TrainedBuf``) that the forward reads and the update writes in place, in the order
of the graph (the order the sparse-update reordering chose). Frozen parameters stay
constant-folded flash arrays, as in inference. A partially trained parameter is split
(``SplitBuf``). An int8 step is lowered from its device form (``..device_form``):
int8 weights and int32 biases, trained ones in SRAM. Ops go to ``TRAIN_HANDLERS``
first (the handler modules of this package), then to the inference handlers.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from .....rewrite.graph import Graph, module_path, op_name
from .....rewrite import int8_layers as int8
from ...inference.lowering.base import Unsupported, conv_shape, ident
from ...inference.lowering.lowerer import Lowerer
from ...program import Buf, Program, Val, c_float, contiguous_strides, numel
from ..device_form import bias_bound, bounded_layers, device_form, inexact_ops, is_int8_step
from .base import TRAIN_HANDLERS
from .buffers import DqBuf, LabelBuf, MaskedBcast, ScaledS8, SplitBuf, TrainedBuf
from .patterns import momentum_parts, readers, update_chain

aten = torch.ops.aten


class TrainLowerer(Lowerer):
    """One walk over a training-step graph (see the module docstring)."""

    int8_elementwise = False   # the step's float ops keep the float semantics its reference has
    float_outputs = False      # an int8 step's layers all requantize (its reference, device_form)
    # memory rewrites of the int8 step (bit for bit the same results; tests turn them off to compare):
    # a mean / sum of an int8 activation reads it as int8, with no float copy (int8._reduce)
    int8_reduce = True
    # a per-channel gradient broadcast over a plane and masked (a global average pool's backward)
    # is never stored whole, the conv backward reading it in channel chunks (int8.conv_bwd_bcast)
    bcast_grads = True
    # a stride-1 depthwise conv's input gradient is written over its output gradient when
    # that dies there (int8.conv_bwd: one plane of scratch)
    inplace_dw_bwd = True
    # an int8 weight's gradient is made one output row at a time by its update (int8.sgd_int)
    fused_update = True
    # an inverted residual block's backward (frozen int8 weights, or partially trained project /
    # expand weights) one expanded channel at a time (int8.ir_bwd): no expanded gradient is
    # stored, only the channels a partially trained expand's weight gradient reads
    ir_bwd = True
    # a mean over the plane of an int8 conv's output read by nothing else but its gradient masks
    # (the global average pool after the last conv) made with the conv and the masks one chunk of
    # output channels at a time (int8.pool_chunks): the conv's output is never stored whole
    chunked_pool = True

    def __init__(self, graph: Graph, *, collect: bool = False):
        ts = graph.meta.get("train_step")
        if not ts:
            raise Unsupported("not a training-step graph")
        self.ts = ts
        self.int8 = is_int8_step(graph)
        if ts["optimizer"].get("momentum") and self.int8:
            raise Unsupported("SGD with momentum in an int8 training step (int8 steps use plain SGD with QAS)")
        self.inexact: list[tuple[str, str, str]] = []
        if self.int8:  # the integers the device keeps (..device_form)
            graph = device_form(graph, check=not collect)
            if collect:
                self.inexact = inexact_ops(graph)
        qas = ts.get("qas") or {}
        self.rounding, self.seed = qas.get("rounding", "nearest"), int(qas.get("seed", 0))
        self.trained_attrs = {info["attr"]: path for path, info in ts["params"].items() if info.get("trained")}
        self._state_attrs = {f"{a}_momentum" for a in self.trained_attrs} if ts["optimizer"].get("momentum") else set()
        self._intercept: dict[str, Buf] = {}      # int8 layer const name -> its trained weight / bias buffer
        self._frozen_w: dict[str, Buf] = {}       # int8 layer const name -> its frozen weight as stored
        self._split_q: dict[str, tuple] = {}      # int8 layer name -> (rows, trained Val, rest Val)
        self._int_store: dict[str, tuple] = {}    # trained attr -> (dtype, per-row QAS factor of the storage)
        self._wgrad: dict[int, tuple] = {}         # id(weight-gradient buf) -> (its step, reads, row length, row code)
        self._bwd_fused: dict[fx.Node, Any] = {}   # backward nodes a fused step computed (int8.ir_bwd) -> value
        self._qconv: dict[int, tuple] = {}         # id(int8 conv output) -> (its gr_conv2d_s8 step, input, row)
        self._mask_steps: dict[int, tuple] = {}    # id(gr_mask_bits_s8 step) -> (its arguments after n, bits)
        self.logits_val: Val | None = None
        self._raw_views = False                   # slicing an int8 activation keeps it int8
        # an int8 step takes its input as int8 (the runners quantize it on the host)
        super().__init__(graph, sparse=False, quantized_inputs=self.int8, collect=collect)
        if self.int8:  # int32 biases within what the accumulator holds (device_form.bias_bound)
            self.qlayers = bounded_layers(self.qlayers)
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
            chain = update_chain(n)
            if chain is not None:
                skip.update(chain[3])
            if momentum_parts(n) is not None:  # mul(v, momentum) folded into the momentum kernel
                skip.add(n.args[0])
        return skip

    # ------------------------------------------------------------ int8 steps
    def add_const(self, name: str, array: np.ndarray, dtype: str) -> Buf:
        """A trained weight or bias is its SRAM buffer; a frozen weight in the layout the
        backward reads is one flash array for both (another layout, e.g. a rearranged
        pointwise weight, is one more array)."""
        buf = self._intercept.get(name)
        if buf is not None:
            return buf
        plain = self._frozen_w.get(name)
        if plain is not None and plain.dtype == dtype and plain.data.dtype == array.dtype \
                and np.array_equal(plain.data, np.asarray(array).reshape(-1)):
            return plain
        return super().add_const(name, array, dtype)

    def val(self, node: Any) -> Val:
        v = super().val(node)
        if isinstance(v, Val) and isinstance(v.buf, DqBuf) and not self._raw_views:  # a reader that needs floats
            return self._float_copy(v)
        if isinstance(v, Val) and isinstance(v.buf, MaskedBcast):  # stored once, for its first other reader
            self.vals[node] = v = self._store_bcast(v)
        return v

    def _store_bcast(self, v: Val) -> Val:
        """A ``MaskedBcast`` as the unfused lowering stores it: the broadcast copied out,
        then masked in place."""
        m: MaskedBcast = v.buf
        src = Val(m.d.buf, v.shape, (m.d.strides[0], m.d.strides[1], *[0] * (len(v.shape) - 2)), m.d.offset)
        g = self.contig(src)
        gx = self.new(g.shape, "f32", inplace_of=g)
        flat = Val(m.bits.buf, (1,), (1,))
        self.emit("gr_masked_grad_f32", "gr_train_s8.c", f"gr_masked_grad_f32({g.ptr()}, {flat.ptr()}, {g.numel}, "
                  f"{gx.out()});", [g, flat], [gx], op="masked_grad")
        self.kernel_files.update({"gr_train.h", "gr_train.c"})
        return gx

    def _float_copy(self, v: Val) -> Val:
        """A float copy of a dequantized int8 activation, made right before the reader that needs it."""
        d: DqBuf = v.buf
        y = self.new(d.q.shape, "f32", name=d.name + "_f32")
        self.emit("gr_dequantize_i8_f32", "gr_int8.c",
                  f"gr_dequantize_i8_f32({d.q.ptr()}, {y.out()}, {d.q.numel}, {c_float(d.scale)}, {d.zp});",
                  [d.q], [y], op="dequantize (float copy for " + (op_name(self.current) if self.current else "?") + ")")
        return Val(y.buf, v.shape, v.strides, v.offset)

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
            name = ident(module_path(ql.layer) or ql.layer.name)
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
                self._int_store[wq_attr] = ("i8", np.ones(shape[0]), 127)  # the chain already holds s * s^-2
            if path is None:  # the forward kernels may take it rearranged (Lowerer._constants_fixed)
                self._frozen_w[name + "_w"] = buf
            else:
                self._intercept[name + "_w"] = val.buf if not isinstance(val.buf, SplitBuf) else val.buf.trained.buf
            if wq_attr in attrs:
                self.vals[attrs[wq_attr]] = val
                scale = Lowerer.add_const(self, name + "_wscale", ql.w_scales.astype(np.float32), "f32")
                self._scaled[wq_attr] = ScaledS8(self._unique(name + "_ws8"), "scaled", 0, "f32",
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
                self._int_store[str(b_node.target)] = ("i32", 1.0 / sb, bias_bound(ql))

    def _stream_partner(self, ql: int8.QLayer) -> int8.QLayer | None:
        """As in inference, trained biases included (their folded bases are made at run
        time), but not a pair with a trained weight: the kernel takes the expand's weights
        rearranged at code generation, and such a pair never streams anyway (the
        expand's output quantizer mask, or the depthwise's weight gradient, reads the
        expanded tensor)."""
        dw = super()._stream_partner(ql)
        if dw is not None and any(self._trained(ident(module_path(q.layer) or q.layer.name), "_w")
                                  for q in (ql, dw)):
            return None
        return dw

    def _reads_shape_only(self, node: fx.Node, x: fx.Node) -> bool:
        """A convolution's backward reads its saved input ``x`` only for the weight gradient
        (``int8.conv_bwd``): without one (a trained bias, a gradient passed on) it takes
        the input's shape alone, and a streamed expand may leave that input unstored."""
        return node.target == aten.convolution_backward.default and node.args[1] is x \
            and node.args[0] is not x and node.args[2] is not x and not node.args[10][1]

    def _qmac(self, ql: int8.QLayer, x: Val, y: Val, out_shape: tuple[int, ...]) -> None:
        name = ident(module_path(ql.layer) or ql.layer.name)
        if name not in self._split_q:
            n_steps = len(self.steps)
            super()._qmac(ql, x, y, out_shape)
            if ql.kind == "conv" and len(self.steps) == n_steps + 1 and self.steps[-1].kernel == "gr_conv2d_s8" \
                    and self.steps[-1].writes == [y.buf] and ql.conv["groups"] == 1:
                # it may be made in chunks of output channels (int8.pool_chunks)
                self._qconv[id(y.buf)] = (self.steps[-1], x, int(np.prod(ql.weight.shape[1:])))
            return None
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
            s, m = conv_shape((1, ic, h, w_), part.shape, (1, k, oh, ow), {**ql.conv, "groups": groups})
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
            for reader in readers(w):
                if order[reader] > order[n] and reader.meta.get("custom", {}).get("train_role") != "update":
                    raise Unsupported(f"{attr} is read by {reader.name} after its in-place update")

    def run(self) -> Program:
        self._scaled: dict[str, ScaledS8] = {}
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
        prog = super().run()
        self._drop_unread(prog)
        return prog

    def _drop_unread(self, prog: Program) -> None:
        """Frozen int8 weights in the backward's layout that no step reads (their forward
        kernels took another layout and no gradient flows through them) leave flash."""
        code = "\n".join(st.code for st in prog.steps)
        unread = {id(b) for b in self._frozen_w.values() if not re.search(rf"\b{re.escape(b.name)}\b", code)}
        prog.consts = [b for b in prog.consts if id(b) not in unread]

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
        if node in self._bwd_fused:
            self.vals[node] = self._bwd_fused.pop(node)
            return
        handler = TRAIN_HANDLERS.get(node.target)
        if handler is None:
            return super()._lower(node)
        try:
            self.vals[node] = handler(self, node)
        except Unsupported as exc:
            if not self.collect:
                raise Unsupported(f"{op_name(node)} at {module_path(node) or '<root>'}: {exc}") from None
            self.unsupported.append((op_name(node), module_path(node) or "<root>", str(exc)))
            self.vals[node] = self._placeholder_for(node)
