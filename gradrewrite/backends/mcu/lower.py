"""ATen graph -> ``Program`` (kernel calls over planned buffers).

Walks the graph in order. Constant subgraphs (weights, ``arange``, a weight's
transpose, a position embedding lookup) are evaluated here and become flash arrays.
Views become strided ``Val``s on their base buffer; a kernel that needs contiguous
data gets a copy only then. conv/linear absorb a following relu/relu6/hardtanh, and
int8 QDQ chains become integer kernels (``int8.py``). With ``collect=True`` the
lowering goes on past unsupported ops and lists them all (``gradrewrite check``).
"""
from __future__ import annotations

import math
import operator
import re
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from ...rewrite.graph import Graph, module_path, op_name
from ...rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_TENSOR
from ...rewrite import int8_layers as int8
from . import nm
from .program import (ITEMSIZE, TORCH_DTYPES, Buf, Program, Step, Val, c_float, c_ints,
                      contiguous_strides, numel)

aten = torch.ops.aten
INF = math.inf


class Unsupported(Exception):
    """This node cannot be generated; the message says why."""


def _ident(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _dtype(t: torch.dtype) -> str:
    name = str(t).removeprefix("torch.")
    if name not in TORCH_DTYPES:
        raise Unsupported(f"dtype {name} has no C kernels")
    return TORCH_DTYPES[name]


def _val_meta(node: fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise Unsupported("output shape unknown")
    return val


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in _val_meta(node).shape)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


class Lowerer:
    def __init__(self, graph: Graph, *, collect: bool = False, sparse: bool = True,
                 quantized_inputs: bool = False, stream: bool = True):
        self.graph = graph
        self.collect = collect
        self.sparse = sparse
        # a float input whose only readers quantize it to int8: the C API takes the int8 tensor
        self.quantized_inputs = quantized_inputs
        # int8 depthwise convs in place of a dying input; pointwise expand + depthwise streamed
        self.stream = stream
        self.input_quant: list[dict | None] = []
        self._dw_inplace: list[tuple[Step, Val, Val, str]] = []
        self._fused: dict[fx.Node, Val] = {}   # depthwise head -> output its streamed expand wrote
        self.vals: dict[fx.Node, Any] = {}
        self.steps: list[Step] = []
        self.consts: list[Buf] = []
        self.arena: list[Buf] = []
        self.kernel_files: set[str] = {"gr_kernels.h", "gr_dsp.h", "gr_tensor.c"}  # outputs are copied out
        self.unsupported: list[tuple[str, str, str]] = []
        self._const_cache: dict[fx.Node, torch.Tensor] = {}
        self._const_val: dict[Any, Val] = {}
        self._is_const: dict[fx.Node, bool] = {}
        self._fusable: dict[fx.Node, Step] = {}
        self._names: set[str] = set()
        self.qlayers = int8.find(graph)
        self.skip = self._dead_after_patterns()
        self.nm_layers = 0
        self.current: fx.Node | None = None

    # ----------------------------------------------------------------- helpers
    def _unique(self, base: str) -> str:
        name, i = _ident(base), 0
        while name in self._names:
            i += 1
            name = f"{_ident(base)}_{i}"
        self._names.add(name)
        return name

    def _dead_after_patterns(self) -> set[fx.Node]:
        """Nodes only int8 patterns consumed: their kernels replace them."""
        needed: set[fx.Node] = set()
        out = next(n for n in self.graph.gm.graph.nodes if n.op == "output")
        stack = [out]
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            deps = self.qlayers[n].inputs if n in self.qlayers else n.all_input_nodes
            stack.extend(deps)
        return {n for n in self.graph.gm.graph.nodes if n.op == "call_function" and n not in needed}

    def is_const(self, node: Any) -> bool:
        if not isinstance(node, fx.Node):
            return True
        if node not in self._is_const:
            if node.op == "get_attr":
                res = True
            elif node.op == "call_function" and node.target != DEQUANTIZE_PER_CHANNEL:
                res = all(self.is_const(a) for a in node.all_input_nodes) and \
                    not str(op_name(node)).startswith(("aten.rand", "aten.normal", "aten.bernoulli"))
            else:
                res = False
            self._is_const[node] = res
        return self._is_const[node]

    def const_value(self, node: Any) -> Any:
        if not isinstance(node, fx.Node):
            return node
        if node not in self._const_cache:
            if node.op == "get_attr":
                value = self.graph.attr(node)
            else:
                args = fx.node.map_arg(node.args, self.const_value)
                kwargs = fx.node.map_arg(node.kwargs, self.const_value)
                with torch.no_grad():
                    value = node.target(*args, **kwargs)
            self._const_cache[node] = value.detach() if isinstance(value, torch.Tensor) else value
        return self._const_cache[node]

    def add_const(self, name: str, array: np.ndarray, dtype: str) -> Buf:
        buf = Buf(self._unique("w_" + name), "const", array.nbytes, dtype, data=np.ascontiguousarray(array))
        self.consts.append(buf)
        return buf

    def const_val(self, node: Any, dtype: str | None = None) -> Val:
        """A flash array for a constant tensor node (deduplicated by storage)."""
        t = self.const_value(node)
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, dtype=torch.float32)
        t = t.contiguous()
        dt = dtype or _dtype(t.dtype)
        key = (t.data_ptr(), tuple(t.shape), dt) if t.numel() else id(t)
        if key not in self._const_val:
            arr = t.numpy().astype({"f32": np.float32, "i8": np.int8, "i32": np.int32,
                                    "i64": np.int64, "u8": np.uint8}[dt])
            name = str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else \
                (node.name if isinstance(node, fx.Node) else "const")
            buf = self.add_const(name, arr.reshape(-1), dt)
            self._const_val[key] = Val(buf, tuple(t.shape), contiguous_strides(tuple(t.shape)))
        return self._const_val[key]

    def val(self, node: Any) -> Val:
        if isinstance(node, fx.Node) and node in self.vals:
            return self.vals[node]
        if self.is_const(node):
            return self.const_val(node)
        raise Unsupported(f"input {node} was not generated")

    def new(self, shape: tuple[int, ...], dtype: str, name: str | None = None,
            inplace_of: Val | None = None) -> Val:
        base = name or (self.current.name if self.current is not None else "t")
        nbytes = max(1, numel(shape)) * ITEMSIZE[dtype]
        buf = Buf(self._unique(base), "arena", nbytes, dtype)
        if inplace_of is not None and inplace_of.buf.kind == "arena" and inplace_of.is_contiguous() \
                and inplace_of.offset == 0 and inplace_of.buf.nbytes == nbytes:
            buf.inplace_of = inplace_of.buf
        self.arena.append(buf)
        return Val(buf, shape, contiguous_strides(shape))

    def emit(self, kernel: str, file: str, code: str, reads: list[Val], writes: list[Val],
             macs: int = 0, params: dict | None = None, op: str | None = None) -> Step:
        node = self.current
        step = Step(op or (op_name(node) if node is not None else kernel),
                    module_path(node) if node is not None else "", code,
                    [v.buf for v in reads], [v.buf for v in writes], kernel, macs, params or {})
        self.steps.append(step)
        self.kernel_files.add(file)
        return step

    def contig(self, v: Val) -> Val:
        if v.is_contiguous():
            return v
        out = self.new(v.shape, v.dtype, name=f"{v.buf.name}_c")
        self.copy(v, out)
        return out

    def copy(self, src: Val, dst: Val, op: str = "copy") -> None:
        nd = max(1, len(src.shape))
        shape = src.shape or (1,)
        ss = src.strides or (1,)
        ds = dst.strides or (1,)
        code = (f"{{ static const int32_t sh[{nd}] = {c_ints(shape)}, ss[{nd}] = {c_ints(ss)}, "
                f"ds[{nd}] = {c_ints(ds)};\n"
                f"  gr_copy_nd({ITEMSIZE[src.dtype]}, {nd}, sh, {src.ptr()}, ss, {dst.out()}, ds); }}")
        self.emit("gr_copy_nd", "gr_tensor.c", code, [src], [dst], op=op)

    # ----------------------------------------------------------------- main loop
    def run(self) -> Program:
        inputs, offset = [], 0
        for node in self.graph.gm.graph.nodes:
            self.current = node
            if node.op == "placeholder":
                val = _val_meta(node)
                try:
                    dt = _dtype(val.dtype)
                except Unsupported as exc:
                    if not self.collect:
                        raise Unsupported(f"input {node.name}: {exc}") from None
                    self.unsupported.append(("input", node.name, str(exc)))
                    dt = "f32"
                quant = self._input_quantize(node) if self.quantized_inputs else None
                if quant is not None:
                    dt = "i8"
                shape = tuple(int(s) for s in val.shape)
                buf = Buf(_ident(node.name), "input", numel(shape) * ITEMSIZE[dt], dt, offset=offset)
                offset += buf.nbytes
                self.vals[node] = Val(buf, shape, contiguous_strides(shape))
                inputs.append(self.vals[node])
                self.input_quant.append(quant)
                if quant is not None:  # the caller quantized it: its quantize nodes are the input
                    for user in node.users:
                        self.vals[user] = self.vals[node]
                        self.skip.add(user)
            elif node.op == "output":
                outs = [a for a in torch.utils._pytree.tree_leaves(node.args[0]) if isinstance(a, fx.Node)]
                outputs = [self._output(a) for a in outs]
            elif node.op == "call_function" and node not in self.skip and not self.is_const(node):
                self._lower(node)
        self.current = None
        self._depthwise_in_place(outputs)
        return Program(inputs, outputs, self.steps, self.consts, self.arena, self.kernel_files,
                       {"int8_layers": len(self.qlayers), "nm_layers": self.nm_layers,
                        "input_quantize": self.input_quant})

    @staticmethod
    def _input_quantize(node: fx.Node) -> dict | None:
        """(scale, zero point) when every reader of float input ``node`` is the same int8
        quantize_per_tensor, else None."""
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype != torch.float32 or not node.users:
            return None
        params = set()
        for user in node.users:
            if user.op != "call_function" or user.target != QUANTIZE_PER_TENSOR or user.args[0] is not node \
                    or user.kwargs or len(user.args) != 6:
                return None
            scale, zp, qmin, qmax, dtype = user.args[1:6]
            if dtype != torch.int8 or (int(qmin), int(qmax)) != (-128, 127) \
                    or any(isinstance(a, fx.Node) for a in (scale, zp)):
                return None
            params.add((float(scale), int(zp)))
        if len(params) != 1:
            return None
        scale, zp = params.pop()
        return {"scale": scale, "zero_point": zp, "from_dtype": "float32"}

    def _output(self, node: fx.Node) -> Val:
        v = self.val(node) if node in self.vals or self.is_const(node) else None
        if v is None:
            raise Unsupported(f"output {node.name} was not generated")
        return v

    def _lower(self, node: fx.Node) -> None:
        try:
            if node in self._fused:  # computed by its streamed expand conv
                result = self._fused.pop(node)
            elif node in self.qlayers:
                result = self._qlayer(self.qlayers[node])
            else:
                handler = HANDLERS.get(node.target)
                if handler is None:
                    raise Unsupported("no C kernel for this op")
                result = handler(self, node)
            self.vals[node] = result
        except Unsupported as exc:
            if not self.collect:
                raise Unsupported(f"{op_name(node)} at {module_path(node) or '<root>'}: {exc}") from None
            self.unsupported.append((op_name(node), module_path(node) or "<root>", str(exc)))
            self.vals[node] = self._placeholder_for(node)

    def _placeholder_for(self, node: fx.Node):
        """Keep going after an unsupported op (check mode): a fresh buffer of its shape."""
        val = node.meta.get("val")
        if isinstance(val, (list, tuple)):
            return tuple(self.new(tuple(int(s) for s in v.shape), TORCH_DTYPES.get(
                str(v.dtype).removeprefix("torch."), "f32")) for v in val if isinstance(v, torch.Tensor))
        if isinstance(val, torch.Tensor):
            return self.new(tuple(int(s) for s in val.shape),
                            TORCH_DTYPES.get(str(val.dtype).removeprefix("torch."), "f32"))
        return None

    # ----------------------------------------------------------------- int8
    def _qlayer(self, ql: int8.QLayer) -> Val | None:
        x = self.contig(self.val(ql.x))
        dw = self._stream_partner(ql) if self.stream else None
        if dw is not None and x.dtype == "i8":
            self._fused[dw.head] = self._expand_depthwise(ql, dw, x)
            return None  # the expanded tensor is never stored; only `dw` read it
        self.kernel_files.add("gr_int8.c")  # gr_requantize, also used by the N:M kernels
        if x.dtype != "i8":
            raise Unsupported("int8 layer input is not int8")
        out_shape = _shape(ql.post[0].args[0]) if ql.post else _shape(ql.head)
        y = self.new(out_shape, "i8")
        if ql.kind == "add":
            self._qadd(ql, x, y)
        else:
            self._qmac(ql, x, y, out_shape)
        for pool in ql.post:
            self.current = pool
            a = list(pool.args) + [None] * 5
            k = _pair(a[1])
            st = _pair(a[2]) if a[2] else k
            shape = _shape(pool)
            src, y = y, self.new(shape, "i8")
            self.emit("gr_max_pool2d_s8", "gr_int8.c",
                      f"{{ {_pool_shape(src, shape, k, st, _pair(a[3] or 0), _pair(a[4] or 1))}\n"
                      f"  gr_max_pool2d_s8(&s, {src.ptr()}, {y.out()}); }}", [src], [y],
                      op="int8 " + op_name(pool))
        return y

    def _stream_partner(self, ql: int8.QLayer) -> int8.QLayer | None:
        """The depthwise 3x3 layer that is the only reader of pointwise expand ``ql``'s
        output, when both are plain (dense, no pooling) int8 convs, else None."""
        if not (ql.kind == "conv" and not ql.post and tuple(ql.weight.shape[2:]) == (1, 1)
                and ql.conv["stride"] == (1, 1) and ql.conv["padding"] == (0, 0) and ql.conv["groups"] == 1):
            return None
        users = list(ql.head.users)
        if len(users) != 1 or users[0].target != DEQUANTIZE_PER_TENSOR or len(users[0].users) != 1:
            return None
        layer = next(iter(users[0].users))
        dw = next((q for q in self.qlayers.values() if q.layer is layer), None)
        if dw is None or dw.x is not ql.head or dw.post or not _depthwise3x3(dw):
            return None
        if self.sparse and (nm.detect(ql.weight, "conv") or nm.detect(dw.weight, "conv")):
            return None
        return dw

    def _expand_depthwise(self, pw: int8.QLayer, dw: int8.QLayer, x: Val) -> Val:
        """One ``gr_pw_dw_s8`` step for ``dw(pw(x))`` through a one-plane scratch."""
        mid_shape, out_shape = _shape(pw.head), _shape(dw.head)
        y = self.new(out_shape, "i8", name=dw.head.name)
        plane = self.new((mid_shape[2] * mid_shape[3],), "i8", name=dw.head.name + "_plane")
        parts, macs, reads = [], 0, [x]
        for tag, ql, xs, ys in (("p", pw, x.shape, mid_shape), ("d", dw, mid_shape, out_shape)):
            name = _ident(module_path(ql.layer) or ql.layer.name)
            consts = [self.add_const(name + suffix, arr, dt) for suffix, arr, dt in
                      (("_mult", ql.mult, "i32"), ("_shift", ql.shift, "i32"), ("_bias_q", ql.bias_q, "i32"),
                       ("_w", ql.weight.numpy().reshape(-1), "i8"))]
            mult, shift, bias, wv = consts
            s, m = self._conv_shape(xs, tuple(ql.weight.shape), ys, ql.conv)
            macs += m
            parts.append(s.replace("gr_conv_shape s =", f"gr_conv_shape {tag}s =") +
                         f" static const gr_quant_params {tag}q = {{{ql.in_zp}, {ql.out_zp}, {ql.act_min}, "
                         f"{ql.act_max}, {mult.name}, {shift.name}}};")
            parts.append((wv.name, bias.name))
        (ps, (pwn, pbn), ds, (dwn, dbn)) = parts
        self.current = dw.layer
        op = "int8 expand+depthwise " + "+".join(op_name(n) for n in (pw.layer, pw.act, dw.layer, dw.act)
                                                  if n is not None)
        code = (f"{{ {ps}\n  {ds}\n  gr_pw_dw_s8(&ps, &pq, {x.ptr()}, {pwn}, {pbn}, &ds, &dq, {dwn}, {dbn}, "
                f"{y.out()}, {plane.out()}); }}")
        self.emit("gr_pw_dw_s8", "gr_int8.c", code, reads, [y, plane], macs, op=op)
        return y

    def _depthwise_in_place(self, outputs: list[Val]) -> None:
        """Depthwise convs whose int8 input dies at their step write over it (the planner
        then gives the output the input's start); the kernel goes through a one-plane scratch."""
        if not self._dw_inplace:
            return
        last: dict[int, int] = {}
        for i, st in enumerate(self.steps):
            for b in st.reads + st.writes:
                last[id(b)] = i
        for v in outputs:
            last[id(v.buf)] = len(self.steps)
        index = {id(st): i for i, st in enumerate(self.steps)}
        for step, x, y, code in self._dw_inplace:
            if x.buf.kind != "arena" or x.offset or not x.is_contiguous() or x.nbytes != x.buf.nbytes \
                    or last.get(id(x.buf)) != index[id(step)] or y.buf.nbytes > x.buf.nbytes:
                continue
            plane = self.new((y.shape[2] * y.shape[3],), "i8", name=y.buf.name + "_plane")
            y.buf.inplace_of = x.buf
            step.code = code.replace("@PLANE@", plane.out())
            step.kernel = "gr_depthwise_inplace_s8"
            step.op += " in place"
            step.writes.append(plane.buf)

    def _qadd(self, ql: int8.QLayer, a: Val, y: Val) -> None:
        b = self.contig(self.val(ql.x2))
        self.current = ql.layer
        name = _ident(module_path(ql.layer) or ql.layer.name)
        mult = self.add_const(name + "_mult", ql.mult, "i32")
        shift = self.add_const(name + "_shift", ql.shift, "i32")
        y.buf.inplace_of = a.buf if a.buf.kind == "arena" and a.buf.nbytes == y.buf.nbytes \
            and a.is_contiguous() and a.offset == 0 and b.buf is not a.buf else None
        op = "int8 " + op_name(ql.layer) + ("+" + op_name(ql.act) if ql.act is not None else "")
        self.emit("gr_add_s8", "gr_int8.c",
                  f"gr_add_s8({a.ptr()}, {ql.in_zp}, {b.ptr()}, {ql.in2_zp}, {y.out()}, {y.numel}, "
                  f"{mult.name}, {shift.name}, {ql.out_zp}, {ql.act_min}, {ql.act_max});", [a, b], [y], op=op)

    def _qmac(self, ql: int8.QLayer, x: Val, y: Val, out_shape: tuple[int, ...]) -> None:
        name = _ident(module_path(ql.layer) or ql.layer.name)
        mult = self.add_const(name + "_mult", ql.mult, "i32")
        shift = self.add_const(name + "_shift", ql.shift, "i32")
        bias = self.add_const(name + "_bias_q", ql.bias_q, "i32")
        qp = (f"static const gr_quant_params q = {{{ql.in_zp}, {ql.out_zp}, {ql.act_min}, {ql.act_max}, "
              f"{mult.name}, {shift.name}}};")
        w = ql.weight
        packed = nm.detect(w, ql.kind) if self.sparse else None
        op = "int8 " + op_name(ql.layer) + ("+" + op_name(ql.act) if ql.act is not None else "")
        self.current = ql.layer
        if ql.kind == "conv":
            s, macs = self._conv_shape(x.shape, tuple(w.shape), out_shape, ql.conv)
            if packed is not None:
                vals, idx = self._nm_arrays(name, packed, "i8")
                acc = self.new((out_shape[2] * out_shape[3],), "i32", name=name + "_acc")
                code = (f"{{ {s} {qp} {self._nm_struct(packed, idx)}\n"
                        f"  gr_conv2d_nm_s8(&s, &p, &q, {x.ptr()}, {vals.name}, {bias.name}, {y.out()}, "
                        f"{acc.out()}); }}")
                step = self.emit("gr_conv2d_nm_s8", "gr_nm.c", code, [x], [y, acc],
                                 macs * packed.n // packed.m, op=op + f" {packed.n}:{packed.m}")
                step.writes.append(acc.buf)
            else:
                wv = self.add_const(name + "_w", w.numpy().reshape(-1), "i8")
                code = (f"{{ {s} {qp}\n  gr_conv2d_s8(&s, &q, {x.ptr()}, {wv.name}, {bias.name}, "
                        f"{y.out()}); }}")
                step = self.emit("gr_conv2d_s8", "gr_int8.c", code, [x], [y], macs, op=op)
                if self.stream and _depthwise3x3(ql):  # in place if x dies here (known at the end)
                    self._dw_inplace.append((step, x, y, f"{{ {s} {qp}\n  gr_depthwise_inplace_s8(&s, &q, "
                                                         f"{x.ptr()}, {wv.name}, {bias.name}, {y.out()}, @PLANE@); }}"))
        else:
            k, n_out = int(w.shape[1]), int(w.shape[0])
            rows = x.numel // k
            if packed is not None:
                vals, idx = self._nm_arrays(name, packed, "i8")
                acc = self.new((rows,), "i32", name=name + "_acc")
                code = (f"{{ {qp} {self._nm_struct(packed, idx)}\n"
                        f"  gr_linear_nm_s8(&p, &q, {x.ptr()}, {vals.name}, {bias.name}, {y.out()}, "
                        f"{rows}, {n_out}, {acc.out()}); }}")
                self.emit("gr_linear_nm_s8", "gr_nm.c", code, [x], [y, acc],
                          rows * k * n_out * packed.n // packed.m, op=op + f" {packed.n}:{packed.m}")
            else:
                wv = self.add_const(name + "_w", w.numpy().reshape(-1), "i8")
                code = (f"{{ {qp}\n  gr_linear_s8(&q, {x.ptr()}, {wv.name}, {bias.name}, {y.out()}, "
                        f"{rows}, {k}, {n_out}); }}")
                self.emit("gr_linear_s8", "gr_int8.c", code, [x], [y], rows * k * n_out, op=op)

    def _nm_arrays(self, name: str, packed: nm.NMWeight, dtype: str) -> tuple[Buf, Buf]:
        self.nm_layers += 1
        self.kernel_files.add("gr_int8.c")  # gr_nm.c's int8 kernels call gr_requantize
        vals = self.add_const(name + "_nm_values", packed.values, dtype)
        idx = self.add_const(name + "_nm_index", packed.indices, "u8")
        return vals, idx

    @staticmethod
    def _nm_struct(p: nm.NMWeight, idx: Buf) -> str:
        return f"static const gr_nm p = {{{p.n}, {p.m}, {p.bits}, {p.groups}, {p.k}, {idx.name}}};"

    @staticmethod
    def _conv_shape(xs, ws, ys, c) -> tuple[str, int]:
        (sh, sw), (ph, pw), (dh, dw), groups = c["stride"], c["padding"], c["dilation"], c["groups"]
        s = (f"static const gr_conv_shape s = {{{xs[0]}, {xs[1]}, {xs[2]}, {xs[3]}, {ys[1]}, {ys[2]}, "
             f"{ys[3]}, {ws[2]}, {ws[3]}, {sh}, {sw}, {ph}, {pw}, {dh}, {dw}, {groups}}};")
        macs = numel(ys) * ws[1] * ws[2] * ws[3]
        return s, macs


# --------------------------------------------------------------------- handlers
HANDLERS: dict[Any, Callable[[Lowerer, fx.Node], Any]] = {}


def handles(*targets):
    def deco(fn):
        for t in targets:
            HANDLERS[t] = fn
        return fn
    return deco


def _float_in(lw: Lowerer, node: Any) -> Val:
    v = lw.contig(lw.val(node))
    if v.dtype != "f32":
        raise Unsupported(f"expects float32 input, got {v.dtype}")
    return v


@handles(aten.conv2d.default, aten.convolution.default, aten.conv2d.padding)
def _conv(lw: Lowerer, node: fx.Node) -> Val:
    x = _float_in(lw, node.args[0])
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
            dil = _pair(a[5] or 1)
            tot = [dil[i] * (w.shape[2 + i] - 1) for i in range(2)]
            if any(t % 2 for t in tot):
                raise Unsupported("padding='same' with an asymmetric pad")
            padding = (tot[0] // 2, tot[1] // 2)
        c = {"stride": _pair(a[3] or 1), "padding": padding, "dilation": _pair(a[5] or 1),
             "groups": int(a[6] or 1)}
    else:
        c = int8._conv_params(node)
        if c is None:
            raise Unsupported("transposed convolution")
    bias_node = node.args[2] if len(node.args) > 2 else None
    b = lw.const_val(bias_node, "f32") if bias_node is not None else None
    ys = _shape(node)
    y = lw.new(ys, "f32")
    s, macs = Lowerer._conv_shape(x.shape, tuple(w.shape), ys, c)
    bptr = b.ptr() if b is not None else "NULL"
    packed = nm.detect(w, "conv") if lw.sparse else None
    name = _ident(module_path(node) or node.name)
    if packed is not None:
        vals, idx = lw._nm_arrays(name, packed, "f32")
        code = (f"{{ {s} {Lowerer._nm_struct(packed, idx)}\n"
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
    x = _float_in(lw, x_node)
    n_out, k = int(w.shape[0]), int(w.shape[1])
    rows = x.numel // k
    b = lw.const_val(bias_node, "f32") if bias_node is not None else None
    if b is not None and b.numel != n_out:
        raise Unsupported("broadcast bias")
    y = lw.new(_shape(node), "f32")
    bptr = b.ptr() if b is not None else "NULL"
    packed = nm.detect(w, "linear") if lw.sparse else None
    name = _ident(module_path(node) or node.name)
    if packed is not None:
        vals, idx = lw._nm_arrays(name, packed, "f32")
        code = (f"{{ {Lowerer._nm_struct(packed, idx)}\n  gr_linear_nm_f32(&p, {x.ptr()}, {vals.name}, "
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
    x = _float_in(lw, node.args[0])
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


BINARY = {aten.add.Tensor: "GR_ADD", aten.add_.Tensor: "GR_ADD", aten.sub.Tensor: "GR_SUB",
          aten.mul.Tensor: "GR_MUL", aten.mul_.Tensor: "GR_MUL", aten.div.Tensor: "GR_DIV",
          aten.maximum.default: "GR_MAX", aten.minimum.default: "GR_MIN",
          aten.add.Scalar: "GR_ADD", aten.sub.Scalar: "GR_SUB", aten.mul.Scalar: "GR_MUL",
          aten.div.Scalar: "GR_DIV"}


def _binary(lw: Lowerer, node: fx.Node) -> Val:
    op = BINARY[node.target]
    a_node, b_node = node.args[:2]
    alpha = float(node.kwargs.get("alpha", 1))
    ys = _shape(node)
    if not isinstance(b_node, fx.Node) or not isinstance(a_node, fx.Node):
        if not isinstance(a_node, fx.Node):  # scalar OP tensor
            if op in ("GR_ADD", "GR_MUL"):
                a_node, b_node = b_node, a_node
            else:
                raise Unsupported("scalar on the left of sub/div")
        x = _float_in(lw, a_node)
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


@handles(aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int)
def _softmax(lw: Lowerer, node: fx.Node) -> Val:
    x = _float_in(lw, node.args[0])
    dim = int(node.args[1]) % max(1, len(x.shape))
    if dim != len(x.shape) - 1:
        raise Unsupported("softmax over a dimension other than the last")
    log = int(node.target in (aten._log_softmax.default, aten.log_softmax.int))
    cols = x.shape[-1]
    y = lw.new(x.shape, "f32")
    lw.emit("gr_softmax_f32", "gr_elementwise.c",
            f"gr_softmax_f32({x.ptr()}, {y.out()}, {x.numel // cols}, {cols}, {log});", [x], [y])
    return y


@handles(aten.layer_norm.default, aten.native_layer_norm.default)
def _layer_norm(lw: Lowerer, node: fx.Node) -> Any:
    a = list(node.args) + [None] * 6
    x = _float_in(lw, a[0])
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
    x = _float_in(lw, node.args[0])
    dims = sorted(int(d) % len(x.shape) for d in (node.args[1] or range(len(x.shape))))
    if dims != list(range(dims[0], dims[-1] + 1)):
        raise Unsupported("reduction over non-adjacent dimensions")
    if node.kwargs.get("dtype") is not None:
        raise Unsupported("reduction with a dtype")
    outer = numel(x.shape[:dims[0]])
    red = numel(x.shape[dims[0]:dims[-1] + 1])
    inner = numel(x.shape[dims[-1] + 1:])
    y = lw.new(_shape(node), "f32")
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
    x = _float_in(lw, x_node)
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


def _depthwise3x3(ql: int8.QLayer) -> bool:
    """A depthwise 3x3 conv with dilation 1 (the int8 kernels' per-channel fast path)."""
    c, w = ql.conv, ql.weight
    return ql.kind == "conv" and c is not None and w.dim() == 4 and tuple(w.shape[1:]) == (1, 3, 3) \
        and c["groups"] == int(w.shape[0]) and c["dilation"] == (1, 1) \
        and int(ql.x.meta["val"].shape[1]) == c["groups"]


def _pool_shape(x: Val, ys, k, s, p, d, cip=1, div=0) -> str:
    return (f"static const gr_pool_shape s = {{{x.shape[0] * x.shape[1]}, {x.shape[2]}, {x.shape[3]}, "
            f"{ys[2]}, {ys[3]}, {k[0]}, {k[1]}, {s[0]}, {s[1]}, {p[0]}, {p[1]}, {d[0]}, {d[1]}, {cip}, {div}}};")


@handles(aten.max_pool2d.default, aten.max_pool2d_with_indices.default)
def _max_pool(lw: Lowerer, node: fx.Node) -> Any:
    a = list(node.args) + [None] * 6
    x = _float_in(lw, a[0])
    if len(x.shape) != 4:
        raise Unsupported("only NCHW pooling")
    k = _pair(a[1])
    s = _pair(a[2]) if a[2] else k
    p, d = _pair(a[3] or 0), _pair(a[4] or 1)
    shape = _shape(node) if node.target == aten.max_pool2d.default else \
        tuple(int(v) for v in node.meta["val"][0].shape)
    y = lw.new(shape, "f32")
    lw.emit("gr_max_pool2d_f32", "gr_pool.c",
            f"{{ {_pool_shape(x, shape, k, s, p, d)}\n  gr_max_pool2d_f32(&s, {x.ptr()}, {y.out()}); }}", [x], [y])
    if node.target == aten.max_pool2d_with_indices.default:
        if len(node.users) != 1 or any(u.args[1] != 0 for u in node.users):
            raise Unsupported("max pool indices are used")
        return (y, None)
    return y


@handles(aten.avg_pool2d.default)
def _avg_pool(lw: Lowerer, node: fx.Node) -> Val:
    a = list(node.args) + [None] * 8
    x = _float_in(lw, a[0])
    k = _pair(a[1])
    s = _pair(a[2]) if a[2] else k
    p = _pair(a[3] or 0)
    cip = 1 if a[5] is None else int(bool(a[5]))
    div = int(a[6] or 0)
    ys = _shape(node)
    y = lw.new(ys, "f32")
    lw.emit("gr_avg_pool2d_f32", "gr_pool.c",
            f"{{ {_pool_shape(x, ys, k, s, p, (1, 1), cip, div)}\n  gr_avg_pool2d_f32(&s, {x.ptr()}, {y.out()}); }}",
            [x], [y])
    return y


@handles(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
def _adaptive_avg(lw: Lowerer, node: fx.Node) -> Val:
    x = _float_in(lw, node.args[0])
    ys = _shape(node)
    if len(x.shape) != 4:
        raise Unsupported("only NCHW pooling")
    y = lw.new(ys, "f32")
    lw.emit("gr_adaptive_avg_pool2d_f32", "gr_pool.c",
            f"gr_adaptive_avg_pool2d_f32({x.ptr()}, {y.out()}, {x.shape[0] * x.shape[1]}, {x.shape[2]}, "
            f"{x.shape[3]}, {ys[2]}, {ys[3]});", [x], [y])
    return y


# ---- views: no kernel, a new strided Val on the same buffer
def _reshape_to(lw: Lowerer, v: Val, shape: tuple[int, ...]) -> Val:
    v = lw.contig(v)
    return Val(v.buf, shape, contiguous_strides(shape), v.offset)


@handles(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
         aten.unflatten.int, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
         aten.unsqueeze.default, aten.view_as.default)
def _view(lw: Lowerer, node: fx.Node) -> Val:
    v = lw.val(node.args[0])
    shape = _shape(node)
    if v.is_contiguous():
        return Val(v.buf, shape, contiguous_strides(shape), v.offset)
    strides = _view_strides(v.shape, v.strides, shape)
    if strides is not None:
        return Val(v.buf, shape, strides, v.offset)
    return _reshape_to(lw, v, shape)


def _view_strides(old: tuple[int, ...], strides: tuple[int, ...], new: tuple[int, ...]):
    """Strides of ``new`` as a view of a strided tensor, or None when it needs a copy
    (the rule of torch's computeStride: split/merge only runs of dims that are
    contiguous with each other)."""
    if not old:
        return contiguous_strides(new)
    out = [0] * len(new)
    view_d = len(new) - 1
    base = strides[-1]
    t_numel = v_numel = 1
    for d in range(len(old) - 1, -1, -1):
        t_numel *= old[d]
        if d == 0 or (old[d - 1] != 1 and strides[d - 1] != t_numel * base):
            while view_d >= 0 and (v_numel < t_numel or new[view_d] == 1):
                out[view_d] = v_numel * base
                v_numel *= new[view_d]
                view_d -= 1
            if v_numel != t_numel:
                return None
            if d > 0:
                base = strides[d - 1]
                t_numel = v_numel = 1
    return tuple(out) if view_d == -1 else None


@handles(aten.permute.default, aten.transpose.int, aten.t.default, aten.numpy_T.default)
def _permute(lw: Lowerer, node: fx.Node) -> Val:
    v = lw.val(node.args[0])
    nd = len(v.shape)
    if node.target == aten.permute.default:
        perm = [int(p) % nd for p in node.args[1]]
    else:
        perm = list(range(nd))
        if node.target == aten.transpose.int:
            i, j = int(node.args[1]) % nd, int(node.args[2]) % nd
        else:
            i, j = 0, nd - 1
        if nd >= 2:
            perm[i], perm[j] = perm[j], perm[i]
    return Val(v.buf, tuple(v.shape[p] for p in perm), tuple(v.strides[p] for p in perm), v.offset)


@handles(aten.expand.default)
def _expand(lw: Lowerer, node: fx.Node) -> Val:
    v = lw.val(node.args[0])
    shape = _shape(node)
    pad = len(shape) - len(v.shape)
    src_shape, src_strides = (1,) * pad + v.shape, (0,) * pad + v.strides
    strides = tuple(0 if s == 1 and d != 1 else st for s, st, d in zip(src_shape, src_strides, shape))
    return Val(v.buf, shape, strides, v.offset)


@handles(aten.slice.Tensor)
def _slice(lw: Lowerer, node: fx.Node) -> Val:
    v = lw.val(node.args[0])
    a = list(node.args) + [None] * 5
    dim = int(a[1] or 0) % len(v.shape)
    size = v.shape[dim]
    start = 0 if a[2] is None else int(a[2])
    step = int(a[4] or 1)
    start = max(0, min(size, start + size if start < 0 else start))
    shape = _shape(node)
    strides = list(v.strides)
    strides[dim] *= step
    return Val(v.buf, shape, tuple(strides), v.offset + start * v.strides[dim])


@handles(aten.select.int)
def _select(lw: Lowerer, node: fx.Node) -> Val:
    v = lw.val(node.args[0])
    dim = int(node.args[1]) % len(v.shape)
    idx = int(node.args[2]) % v.shape[dim]
    shape = v.shape[:dim] + v.shape[dim + 1:]
    strides = v.strides[:dim] + v.strides[dim + 1:]
    return Val(v.buf, shape, strides, v.offset + idx * v.strides[dim])


@handles(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
def _split(lw: Lowerer, node: fx.Node) -> tuple:
    v = lw.val(node.args[0])
    parts = [tuple(int(s) for s in t.shape) for t in node.meta["val"]]
    dim = int(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(v.shape)
    out, start = [], 0
    for shape in parts:
        out.append(Val(v.buf, shape, v.strides, v.offset + start * v.strides[dim]))
        start += shape[dim]
    return tuple(out)


@handles(operator.getitem)
def _getitem(lw: Lowerer, node: fx.Node) -> Val:
    parent = lw.vals.get(node.args[0])
    if parent is None:
        raise Unsupported("item of an unsupported op")
    item = parent[node.args[1]]
    if item is None:
        raise Unsupported("this output of the op is not generated")
    return item


@handles(aten.alias.default, aten.detach.default, aten.dropout.default, aten.clone.default,
         aten.contiguous.default, aten.lift_fresh_copy.default, aten.feature_dropout.default)
def _identity(lw: Lowerer, node: fx.Node) -> Val:
    return lw.val(node.args[0])


@handles(aten._to_copy.default, aten.to.dtype, aten.type_as.default)
def _to(lw: Lowerer, node: fx.Node) -> Val:
    v = lw.val(node.args[0])
    dt = _dtype(_val_meta(node).dtype)
    if dt == v.dtype:
        return v
    if v.dtype == "i64" and dt == "f32":
        v = lw.contig(v)
        y = lw.new(v.shape, "f32")
        lw.emit("gr_cast_i64_f32", "gr_tensor.c", f"gr_cast_i64_f32({v.ptr()}, {y.out()}, {v.numel});", [v], [y])
        return y
    raise Unsupported(f"cast {v.dtype} -> {dt}")


@handles(aten.cat.default)
def _cat(lw: Lowerer, node: fx.Node) -> Val:
    ys = _shape(node)
    dim = int(node.args[1] if len(node.args) > 1 else 0) % len(ys)
    parts = [lw.val(a) for a in node.args[0]]
    y = lw.new(ys, parts[0].dtype)
    start = 0
    for p in parts:
        if p.numel == 0:
            continue
        dst = Val(y.buf, p.shape, y.strides, start * y.strides[dim])
        lw.copy(p, dst, op="aten.cat")
        start += p.shape[dim]
    return y


@handles(aten.embedding.default)
def _embedding(lw: Lowerer, node: fx.Node) -> Val:
    table = lw.const_val(node.args[0], "f32")
    idx = lw.contig(lw.val(node.args[1]))
    if idx.dtype != "i64":
        raise Unsupported("embedding indices must be int64")
    ys = _shape(node)
    y = lw.new(ys, "f32")
    lw.emit("gr_embedding_f32", "gr_tensor.c",
            f"gr_embedding_f32({table.ptr()}, {table.shape[1]}, {idx.ptr()}, {idx.numel}, {y.out()});", [idx], [y])
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
    ys = _shape(node)
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
    ys = _shape(node)
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


@handles(QUANTIZE_PER_TENSOR)
def _quantize(lw: Lowerer, node: fx.Node) -> Val:
    x = _float_in(lw, node.args[0])
    scale, zp, qmin, qmax, dtype = node.args[1:6]
    if dtype != torch.int8 or (int(qmin), int(qmax)) != (-128, 127):
        raise Unsupported("only int8 [-128, 127] activations")
    y = lw.new(x.shape, "i8")
    inv = float(np.float32(1.0 / float(scale)))
    lw.emit("gr_quantize_f32_i8", "gr_int8.c",
            f"gr_quantize_f32_i8({x.ptr()}, {y.out()}, {x.numel}, {c_float(inv)}, {int(zp)});", [x], [y])
    return y


@handles(DEQUANTIZE_PER_TENSOR)
def _dequantize(lw: Lowerer, node: fx.Node) -> Val:
    x = lw.contig(lw.val(node.args[0]))
    if x.dtype != "i8":
        raise Unsupported("only int8 dequantize")
    y = lw.new(x.shape, "f32")
    lw.emit("gr_dequantize_i8_f32", "gr_int8.c",
            f"gr_dequantize_i8_f32({x.ptr()}, {y.out()}, {x.numel}, {c_float(float(node.args[1]))}, "
            f"{int(node.args[2])});", [x], [y])
    return y


def lower(graph: Graph, *, sparse: bool = True, stream: bool = True) -> Program:
    """The graph as a kernel call sequence; raises ``Unsupported`` at the first op it
    cannot generate (``unsupported_ops`` lists them all). ``stream``: int8 depthwise convs
    in place and pointwise expand + depthwise pairs streamed channel by channel."""
    return Lowerer(graph, sparse=sparse, quantized_inputs=True, stream=stream).run()


def unsupported_ops(graph: Graph) -> list[tuple[str, str, str]]:
    """(op, module path, reason) for every node the backend cannot generate."""
    lw = Lowerer(graph, collect=True, sparse=False)
    try:
        lw.run()
    except Unsupported as exc:  # an output of an unsupported op
        lw.unsupported.append(("output", "<root>", str(exc)))
    return lw.unsupported
