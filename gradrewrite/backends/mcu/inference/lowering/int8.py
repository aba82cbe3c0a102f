"""int8 QDQ layers as integer kernels: the ``Lowerer`` methods for the layers
``rewrite.int8_layers.find`` matches (conv/linear/add with their requantization).

``Int8Layers`` is mixed into ``Lowerer``; it uses the lowerer's buffers (``new``,
``emit``, ``add_const``). Beyond one kernel per layer it streams a pointwise expand
into the depthwise 3x3 conv that alone reads it (``gr_pw_dw_s8``, one plane at a time)
and lets a depthwise conv overwrite its input when that input dies there.
"""
from __future__ import annotations

from .....rewrite.graph import module_path, op_name
from .....rewrite.quant_ops import DEQUANTIZE_PER_TENSOR
from .....rewrite import int8_layers as int8
from .. import nm
from ...program import Val
from .base import Unsupported, conv_shape, ident, nm_struct, pair, pool_shape, shape_of


def depthwise3x3(ql: int8.QLayer) -> bool:
    """A depthwise 3x3 conv with dilation 1 (the int8 kernels' per-channel fast path)."""
    c, w = ql.conv, ql.weight
    return ql.kind == "conv" and c is not None and w.dim() == 4 and tuple(w.shape[1:]) == (1, 3, 3) \
        and c["groups"] == int(w.shape[0]) and c["dilation"] == (1, 1) \
        and int(ql.x.meta["val"].shape[1]) == c["groups"]


class Int8Layers:
    """The int8 half of ``Lowerer`` (see the module docstring)."""

    def _qlayer(self, ql: int8.QLayer) -> Val | None:
        x = self.contig(self.val(ql.x))
        dw = self._stream_partner(ql) if self.stream else None
        if dw is not None and x.dtype == "i8":
            self._fused[dw.head] = self._expand_depthwise(ql, dw, x)
            return None  # the expanded tensor is never stored; only `dw` read it
        self.kernel_files.add("gr_int8.c")  # gr_requantize, also used by the N:M kernels
        if x.dtype != "i8":
            raise Unsupported("int8 layer input is not int8")
        out_shape = shape_of(ql.post[0].args[0]) if ql.post else shape_of(ql.head)
        y = self.new(out_shape, "i8")
        if ql.kind == "add":
            self._qadd(ql, x, y)
        else:
            self._qmac(ql, x, y, out_shape)
        for pool in ql.post:
            self.current = pool
            a = list(pool.args) + [None] * 5
            k = pair(a[1])
            st = pair(a[2]) if a[2] else k
            shape = shape_of(pool)
            src, y = y, self.new(shape, "i8")
            self.emit("gr_max_pool2d_s8", "gr_int8.c",
                      f"{{ {pool_shape(src, shape, k, st, pair(a[3] or 0), pair(a[4] or 1))}\n"
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
        if dw is None or dw.x is not ql.head or dw.post or not depthwise3x3(dw):
            return None
        if self.sparse and (nm.detect(ql.weight, "conv") or nm.detect(dw.weight, "conv")):
            return None
        return dw

    def _expand_depthwise(self, pw: int8.QLayer, dw: int8.QLayer, x: Val) -> Val:
        """One ``gr_pw_dw_s8`` step for ``dw(pw(x))`` through a one-plane scratch."""
        mid_shape, out_shape = shape_of(pw.head), shape_of(dw.head)
        y = self.new(out_shape, "i8", name=dw.head.name)
        plane = self.new((mid_shape[2] * mid_shape[3],), "i8", name=dw.head.name + "_plane")
        parts, macs, reads = [], 0, [x]
        for tag, ql, xs, ys in (("p", pw, x.shape, mid_shape), ("d", dw, mid_shape, out_shape)):
            name = ident(module_path(ql.layer) or ql.layer.name)
            consts = [self.add_const(name + suffix, arr, dt) for suffix, arr, dt in
                      (("_mult", ql.mult, "i32"), ("_shift", ql.shift, "i32"), ("_bias_q", ql.bias_q, "i32"),
                       ("_w", ql.weight.numpy().reshape(-1), "i8"))]
            mult, shift, bias, wv = consts
            s, m = conv_shape(xs, tuple(ql.weight.shape), ys, ql.conv)
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
        name = ident(module_path(ql.layer) or ql.layer.name)
        mult = self.add_const(name + "_mult", ql.mult, "i32")
        shift = self.add_const(name + "_shift", ql.shift, "i32")
        y.buf.inplace_of = a.buf if a.buf.kind == "arena" and a.buf.nbytes == y.buf.nbytes \
            and a.is_contiguous() and a.offset == 0 and b.buf is not a.buf else None
        op = "int8 " + op_name(ql.layer) + ("+" + op_name(ql.act) if ql.act is not None else "")
        self.emit("gr_add_s8", "gr_int8.c",
                  f"gr_add_s8({a.ptr()}, {ql.in_zp}, {b.ptr()}, {ql.in2_zp}, {y.out()}, {y.numel}, "
                  f"{mult.name}, {shift.name}, {ql.out_zp}, {ql.act_min}, {ql.act_max});", [a, b], [y], op=op)

    def _qmac(self, ql: int8.QLayer, x: Val, y: Val, out_shape: tuple[int, ...]) -> None:
        name = ident(module_path(ql.layer) or ql.layer.name)
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
            s, macs = conv_shape(x.shape, tuple(w.shape), out_shape, ql.conv)
            if packed is not None:
                vals, idx = self._nm_arrays(name, packed, "i8")
                acc = self.new((out_shape[2] * out_shape[3],), "i32", name=name + "_acc")
                code = (f"{{ {s} {qp} {nm_struct(packed, idx)}\n"
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
                if self.stream and depthwise3x3(ql):  # in place if x dies here (known at the end)
                    self._dw_inplace.append((step, x, y, f"{{ {s} {qp}\n  gr_depthwise_inplace_s8(&s, &q, "
                                                         f"{x.ptr()}, {wv.name}, {bias.name}, {y.out()}, @PLANE@); }}"))
        else:
            k, n_out = int(w.shape[1]), int(w.shape[0])
            rows = x.numel // k
            if packed is not None:
                vals, idx = self._nm_arrays(name, packed, "i8")
                acc = self.new((rows,), "i32", name=name + "_acc")
                code = (f"{{ {qp} {nm_struct(packed, idx)}\n"
                        f"  gr_linear_nm_s8(&p, &q, {x.ptr()}, {vals.name}, {bias.name}, {y.out()}, "
                        f"{rows}, {n_out}, {acc.out()}); }}")
                self.emit("gr_linear_nm_s8", "gr_nm.c", code, [x], [y, acc],
                          rows * k * n_out * packed.n // packed.m, op=op + f" {packed.n}:{packed.m}")
            else:
                wv = self.add_const(name + "_w", w.numpy().reshape(-1), "i8")
                code = (f"{{ {qp}\n  gr_linear_s8(&q, {x.ptr()}, {wv.name}, {bias.name}, {y.out()}, "
                        f"{rows}, {k}, {n_out}); }}")
                self.emit("gr_linear_s8", "gr_int8.c", code, [x], [y], rows * k * n_out, op=op)
