"""int8 QDQ layers as integer kernels: the ``Lowerer`` methods for the layers
``rewrite.int8_layers.find`` matches (conv/linear/add with their requantization).

``Int8Layers`` is mixed into ``Lowerer``; it uses the lowerer's buffers (``new``,
``emit``, ``add_const``). Beyond one kernel per layer it streams a pointwise expand
into the depthwise 3x3 conv that alone reads it (``gr_pw_dw_s8``, a few rows at a time)
and lets a depthwise conv overwrite its input when that input dies there. A training
step streams pairs whose biases it updates too: their folded bases are made at run time,
right before the pair (``_runtime_base``).
"""
from __future__ import annotations

import numpy as np

from .....rewrite.graph import module_path, op_name
from .....rewrite.quant_ops import DEQUANTIZE_PER_TENSOR
from .....rewrite import int8_layers as int8
from .. import nm
from ...program import Val
from .base import Unsupported, conv_shape, ident, nm_struct, pair, pool_shape, shape_of
from .int8_elementwise import emit_add


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
        if ql.float_out:
            return self._float_output(ql, x)
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
        if len(users) != 1 or users[0].target != DEQUANTIZE_PER_TENSOR:
            return None
        readers = [u for u in users[0].users if not self._reads_shape_only(u, users[0])]
        if len(readers) != 1:
            return None
        layer = readers[0]
        dw = next((q for q in self.qlayers.values() if q.layer is layer), None)
        if dw is None or dw.x is not ql.head or dw.post or dw.float_out or not depthwise3x3(dw):
            return None
        if self.sparse and (nm.detect(dw.weight, "conv") or self._nm_pointwise(ql) is False):
            return None
        return dw

    def _reads_shape_only(self, node, x) -> bool:
        """Whether ``node`` takes tensor ``x`` without reading its values (a training step's
        backward, see the training lowerer); nothing does in an inference graph."""
        return False

    def _expand_depthwise(self, pw: int8.QLayer, dw: int8.QLayer, x: Val) -> Val:
        """One ``gr_pw_dw_s8`` step for ``dw(pw(x))``: row by row through a ring of three
        padded rows per expanded channel; weights and folded bases as the unstreamed
        kernels take them (the expand dense or N:M packed); a base a training step
        updates is made first (``_runtime_base``)."""
        mid_shape, out_shape = shape_of(pw.head), shape_of(dw.head)
        y = self.new(out_shape, "i8", name=dw.head.name)
        ring = self.new((_ring_bytes(dw, mid_shape, out_shape),), "i8", name=dw.head.name + "_ring")
        prep: list[str] = []
        scratch: list[Val] = []
        pw_struct, words, packed = self._pw_weights(pw, ident(module_path(pw.layer) or pw.layer.name),
                                                    prep, scratch)
        xs = self.new((words,), "i32", name=dw.head.name + "_xs")
        dname = ident(module_path(dw.layer) or dw.layer.name)
        dbase = self._runtime_base(dw, dname, prep, scratch)
        dwv = self.add_const(dname + "_w", dw.weight.numpy().reshape(-1), "i8")
        ps, macs = conv_shape(x.shape, tuple(pw.weight.shape), mid_shape, pw.conv)
        ds, dmacs = conv_shape(mid_shape, tuple(dw.weight.shape), out_shape, dw.conv)
        ps = ps.replace("gr_conv_shape s =", "gr_conv_shape ps =") + " " + self._qparams(pw, "pq")
        ds = ds.replace("gr_conv_shape s =", "gr_conv_shape ds =") + " " + self._qparams(dw, "dq")
        tag = ""
        if packed is not None:
            macs, tag = macs * packed.n // packed.m, f" {packed.n}:{packed.m}"
        self.current = dw.layer
        op = "int8 expand+depthwise " + "+".join(op_name(n) for n in (pw.layer, pw.act, dw.layer, dw.act)
                                                  if n is not None)
        code = (f"{{ {ps} {pw_struct}\n  {ds}\n" + "".join(f"  {c}\n" for c in prep) +
                f"  gr_pw_dw_s8(&ps, &pq, {x.ptr()}, &pw, &ds, &dq, {dwv.name}, "
                f"{dbase}, {y.out()}, {ring.out()}, {xs.out()}); }}")
        self.emit("gr_pw_dw_s8", "gr_int8.c", code, [x], [y, ring, xs, *scratch], macs + dmacs,
                  op=op + tag + (" (run-time bases)" if prep else ""))
        return y

    def _nm_pointwise(self, ql: int8.QLayer):
        """A pointwise int8 layer's N:M packing with its ``gr_pointwise_nm_s8`` format
        ((packed, fmt)); None when the dense kernel runs it (a dense weight, or 2:4 with few
        output channels); False when only the generic N:M kernel does."""
        packed = nm.detect(ql.weight, ql.kind) if self.sparse else None
        if packed is None:
            return None
        fmt = nm.pointwise_format(packed, int(ql.weight.shape[0])) if pointwise(ql) else None
        return None if fmt == nm.PW_DENSE else (packed, fmt) if fmt else False

    def _qparams(self, ql: int8.QLayer, var: str = "q") -> str:
        name = ident(module_path(ql.layer) or ql.layer.name)
        mult = self.add_const(name + "_mult", ql.mult, "i32")
        shift = self.add_const(name + "_shift", ql.shift, "i32")
        return (f"static const gr_quant_params {var} = {{{ql.in_zp}, {ql.out_zp}, {ql.act_min}, {ql.act_max}, "
                f"{mult.name}, {shift.name}}};")

    def _pw_weights(self, ql: int8.QLayer, name: str, prep: list[str] | None = None,
                    scratch: list[Val] | None = None) -> tuple[str, int, nm.NMWeight | None]:
        """The ``gr_pw_weights pw`` struct of pointwise layer ``ql`` (dense, or N:M packed
        when the lowering is sparse and a packed format pays), the int32 words of the
        gather scratch it needs, and the N:M packing (None: dense). With ``prep`` (C
        statements run first, writing the arena arrays appended to ``scratch``), a bias a
        training step updates is allowed: its base is made at run time."""
        w = ql.weight
        cin = int(w.shape[1])
        if prep is None:
            base = self.add_const(name + "_base", folded_base(ql), "i32").name
        else:
            base = self._runtime_base(ql, name, prep, scratch)
        found = self._nm_pointwise(ql)
        if found:
            packed, fmt = found
            entries, count = nm.pointwise_entries(w.numpy().reshape(w.shape[0], -1), fmt)
            wv = self.add_const(name + "_nm_w", entries.reshape(-1), "i32")
            self.nm_layers += 1
            return (f"static const gr_pw_weights pw = {{{fmt}, {count}, {4 * count}, {wv.name}, {base}}};",
                    nm.pointwise_scratch_words(fmt, cin), packed)
        wv = self.add_const(name + "_w", pointwise_weights(w), "i8")
        static = "static " if base.isidentifier() else ""   # an arena base: set at each call
        return (f"{static}const gr_pw_weights pw = {{0, {_round4(cin) // 4}, {_round4(cin)}, {wv.name}, "
                f"{base}}};", nm.pointwise_scratch_words(0, cin), None)

    def _runtime_base(self, ql: int8.QLayer, name: str, prep: list[str], scratch: list[Val]) -> str:
        """The folded base of ``ql`` as a C pointer: a flash array when its bias is the
        quantizer's constant; else (a bias the training step updates, its weight frozen:
        the training lowerer streams no pair with a trained weight) an arena array that
        ``gr_base_s8`` fills in ``prep``: the bias plus the weights' zero-point term."""
        if self._trained(name, "_w"):
            raise Unsupported(f"{name}: a streamed int8 conv with a trained weight")
        if not self._trained(name, "_bias_q"):
            return self.add_const(name + "_base", folded_base(ql), "i32").name
        oc = int(ql.weight.shape[0])
        bias = self.add_const(name + "_bias_q", ql.bias_q, "i32")   # the step's int32 bias buffer
        zterm = self.add_const(name + "_zterm", zero_point_term(ql), "i32")
        base = self.new((oc,), "i32", name=ql.head.name + "_base")
        prep.append(f"gr_base_s8({bias.name}, {zterm.name}, {oc}, {base.out()});")
        scratch.append(base)
        return base.ptr()

    def _depthwise_in_place(self, outputs: list[Val]) -> None:
        """Depthwise convs whose int8 input dies at their step write over it (the planner
        then gives the output the input's start); the kernel copies each input plane out first."""
        if not self._dw_inplace:
            return
        last: dict[int, int] = {}
        for i, st in enumerate(self.steps):
            for b in st.reads + st.writes:
                last[id(b)] = i
        for v in outputs:
            last[id(v.buf)] = len(self.steps)
        index = {id(st): i for i, st in enumerate(self.steps)}
        for step, x, y in self._dw_inplace:
            if x.buf.kind != "arena" or x.offset or not x.is_contiguous() or x.nbytes != x.buf.nbytes \
                    or last.get(id(x.buf)) != index[id(step)] or y.buf.nbytes > x.buf.nbytes:
                continue
            y.buf.inplace_of = x.buf  # gr_depthwise3x3_s8 copies each plane out before writing its output
            step.op += " in place"

    def _qadd(self, ql: int8.QLayer, a: Val, y: Val) -> None:
        b = self.contig(self.val(ql.x2))
        self.current = ql.layer
        name = ident(module_path(ql.layer) or ql.layer.name)
        y.buf.inplace_of = a.buf if a.buf.kind == "arena" and a.buf.nbytes == y.buf.nbytes \
            and a.is_contiguous() and a.offset == 0 and b.buf is not a.buf else None
        op = "int8 " + op_name(ql.layer) + ("+" + op_name(ql.act) if ql.act is not None else "")
        emit_add(self, a, b, y, (ql.in_zp, ql.in2_zp), ql.mult, ql.shift, ql.out_zp, ql.act_min, ql.act_max,
                 name, op)   # TFLite's int8 add, per-input terms tabulated

    def _qmac(self, ql: int8.QLayer, x: Val, y: Val, out_shape: tuple[int, ...]) -> None:
        name = ident(module_path(ql.layer) or ql.layer.name)
        qp = self._qparams(ql)
        bias = self.add_const(name + "_bias_q", ql.bias_q, "i32")
        w = ql.weight
        packed = nm.detect(w, ql.kind) if self.sparse else None
        op = "int8 " + op_name(ql.layer) + ("+" + op_name(ql.act) if ql.act is not None else "")
        self.current = ql.layer
        if ql.kind == "conv":
            s, macs = conv_shape(x.shape, tuple(w.shape), out_shape, ql.conv)
            found = self._nm_pointwise(ql) if packed is not None else None
            if found and self._constants_fixed(name):
                pw_struct, words, _ = self._pw_weights(ql, name)
                xs = self.new((words,), "i32", name=ql.head.name + "_xs")
                code = (f"{{ {s} {qp} {pw_struct}\n  gr_pointwise_nm_s8(&s, &q, {x.ptr()}, &pw, {y.out()}, "
                        f"{xs.out()}); }}")
                self.emit("gr_pointwise_nm_s8", "gr_int8.c", code, [x], [y, xs],
                          macs * packed.n // packed.m, op=op + f" {packed.n}:{packed.m}")
            elif packed is not None and found is not None:
                vals, idx = self._nm_arrays(name, packed, "i8")
                acc = self.new((out_shape[2] * out_shape[3],), "i32", name=name + "_acc")
                code = (f"{{ {s} {qp} {nm_struct(packed, idx)}\n"
                        f"  gr_conv2d_nm_s8(&s, &p, &q, {x.ptr()}, {vals.name}, {bias.name}, {y.out()}, "
                        f"{acc.out()}); }}")
                step = self.emit("gr_conv2d_nm_s8", "gr_nm.c", code, [x], [y, acc],
                                 macs * packed.n // packed.m, op=op + f" {packed.n}:{packed.m}")
                step.writes.append(acc.buf)
            elif pointwise(ql) and self._constants_fixed(name):
                wv = self.add_const(name + "_w", pointwise_weights(w), "i8")
                base = self.add_const(name + "_base", folded_base(ql), "i32")
                xs = self.new((2 * _round4(int(w.shape[1])),), "i32", name=ql.head.name + "_xs")
                code = (f"{{ {s} {qp}\n  gr_pointwise_s8(&s, &q, {x.ptr()}, {wv.name}, {base.name}, "
                        f"{y.out()}, {xs.out()}); }}")
                self.emit("gr_pointwise_s8", "gr_int8.c", code, [x], [y, xs], macs, op=op)
            elif depthwise3x3(ql) and self._constants_fixed(name):
                wv = self.add_const(name + "_w", w.numpy().reshape(-1), "i8")
                base = self.add_const(name + "_base", folded_base(ql), "i32")
                pad = self.new((_pad_bytes(ql, out_shape),), "i8", name=ql.head.name + "_pad")
                code = (f"{{ {s} {qp}\n  gr_depthwise3x3_s8(&s, &q, {x.ptr()}, {wv.name}, {base.name}, "
                        f"{y.out()}, {pad.out()}); }}")
                step = self.emit("gr_depthwise3x3_s8", "gr_int8.c", code, [x], [y, pad], macs, op=op)
                if self.stream:  # in place if x dies here (known at the end)
                    self._dw_inplace.append((step, x, y))
            else:
                wv = self.add_const(name + "_w", w.numpy().reshape(-1), "i8")
                code = (f"{{ {s} {qp}\n  gr_conv2d_s8(&s, &q, {x.ptr()}, {wv.name}, {bias.name}, "
                        f"{y.out()}); }}")
                self.emit("gr_conv2d_s8", "gr_int8.c", code, [x], [y], macs, op=op)
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
            elif self._constants_fixed(name):
                wv, base = self._fc_consts(ql, name)
                code = (f"{{ {qp}\n  gr_fc_s8(&q, {x.ptr()}, (const int8_t *){wv.name}, {base.name}, "
                        f"{y.out()}, {rows}, {k}, {n_out}); }}")
                self.emit("gr_fc_s8", "gr_int8.c", code, [x], [y], rows * k * n_out, op=op)
            else:
                wv = self.add_const(name + "_w", w.numpy().reshape(-1), "i8")
                code = (f"{{ {qp}\n  gr_linear_s8(&q, {x.ptr()}, {wv.name}, {bias.name}, {y.out()}, "
                        f"{rows}, {k}, {n_out}); }}")
                self.emit("gr_linear_s8", "gr_int8.c", code, [x], [y], rows * k * n_out, op=op)

    def _float_output(self, ql: int8.QLayer, x: Val) -> Val:
        """An int8 conv/linear whose output stays float (its readers compute in float):
        the int32 accumulator times ``ql.out_scale`` per output channel, no requantization
        (``gr_fc_s8_f32`` on ``gr_fc_s8``'s weights and folded base; ``gr_conv2d_s8_f32``)."""
        name = ident(module_path(ql.layer) or ql.layer.name)
        out_shape = shape_of(ql.head)
        y = self.new(out_shape, "f32")
        scale = self.add_const(name + "_out_scale", ql.out_scale, "f32")
        w = ql.weight
        op = "int8 " + op_name(ql.layer) + " (float output)"
        self.current = ql.layer
        if ql.kind == "conv":
            s, macs = conv_shape(x.shape, tuple(w.shape), out_shape, ql.conv)
            wv = self.add_const(name + "_w", w.numpy().reshape(-1), "i8")
            bias = self.add_const(name + "_bias_q", ql.bias_q, "i32")
            code = (f"{{ {s}\n  gr_conv2d_s8_f32(&s, {ql.in_zp}, {x.ptr()}, {wv.name}, {bias.name}, "
                    f"{scale.name}, {y.out()}); }}")
            self.emit("gr_conv2d_s8_f32", "gr_int8.c", code, [x], [y], macs, op=op)
        else:
            k, n_out = int(w.shape[1]), int(w.shape[0])
            wv, base = self._fc_consts(ql, name)
            self.emit("gr_fc_s8_f32", "gr_int8.c",
                      f"gr_fc_s8_f32({x.ptr()}, (const int8_t *){wv.name}, {base.name}, {scale.name}, "
                      f"{y.out()}, {x.numel // k}, {k}, {n_out});", [x], [y], x.numel * n_out, op=op)
        return y

    def _fc_consts(self, ql: int8.QLayer, name: str):
        """``gr_fc_s8``'s weights (interleaved, stored as int32: word-aligned for LDRD) and
        folded base."""
        return (self.add_const(name + "_w", fc_weights(ql.weight), "i32"),
                self.add_const(name + "_base", folded_base(ql), "i32"))

    def _constants_fixed(self, name: str) -> bool:
        """Whether layer ``name``'s weight and bias are the constants the quantizer made.
        The kernels that take rearranged weights and a folded bias need that (or their
        run-time form, ``_runtime_base``); the training lowerer swaps in buffers its step
        updates, which only the plain kernels read as they are."""
        return not (self._trained(name, "_w") or self._trained(name, "_bias_q"))

    def _trained(self, name: str, suffix: str) -> bool:
        """Whether constant ``name + suffix`` (``_w``, ``_bias_q``) is a buffer a training
        step updates (the training lowerer's ``_intercept``)."""
        return name + suffix in getattr(self, "_intercept", {})


def pad_plane_bytes(oh: int, ow: int, sh: int, sw: int) -> int:
    """The zero-point-padded input plane a depthwise 3x3 reads for an ``oh x ow`` output
    (+ 4: its last word load)."""
    return ((oh - 1) * sh + 3) * ((ow - 1) * sw + 3) + 4


def ring_rows_bytes(channels: int, ow: int, w: int, sw: int, pw: int) -> int:
    """``gr_pw_dw_s8``'s ring: three zero-point-padded rows of each expanded channel (+ 4
    for the last word load)."""
    return channels * 3 * max((ow - 1) * sw + 3, pw + w) + 4


def _pad_bytes(ql: int8.QLayer, out_shape) -> int:
    return pad_plane_bytes(out_shape[2], out_shape[3], *ql.conv["stride"])


def _ring_bytes(dw: int8.QLayer, mid_shape, out_shape) -> int:
    """The ring, rounded up to the arena's 16-byte alignment."""
    n = ring_rows_bytes(mid_shape[1], out_shape[3], mid_shape[3], dw.conv["stride"][1], dw.conv["padding"][1])
    return -(-n // 16) * 16


def _round4(n: int) -> int:
    return -(-n // 4) * 4


def pointwise(ql: int8.QLayer) -> bool:
    """A 1x1 conv without padding or groups (any stride): ``gr_pointwise_s8``."""
    c = ql.conv
    return ql.kind == "conv" and c is not None and tuple(ql.weight.shape[2:]) == (1, 1) \
        and c["padding"] == (0, 0) and c["groups"] == 1


def folded_base(ql: int8.QLayer) -> np.ndarray:
    """bias_q - in_zp * (sum of each output channel's weights): the input zero point leaves
    the kernels' loops at code-generation time (sum w (x - zp) = sum w x - zp sum w)."""
    w = ql.weight.numpy().astype(np.int64).reshape(ql.weight.shape[0], -1)
    bias = ql.bias_q.astype(np.int64) if ql.bias_q is not None else np.zeros(w.shape[0], np.int64)
    base = bias - int(ql.in_zp) * w.sum(1)
    if np.abs(base).max(initial=0) >= 2 ** 31:
        raise Unsupported("the folded int8 bias overflows int32")
    return base.astype(np.int32)


def zero_point_term(ql: int8.QLayer) -> np.ndarray:
    """-in_zp * (sum of each output channel's weights): ``folded_base`` without the bias,
    for a layer whose bias a training step updates (``gr_base_s8`` adds it at run time)."""
    w = ql.weight.numpy().astype(np.int64).reshape(ql.weight.shape[0], -1)
    term = -int(ql.in_zp) * w.sum(1)
    if np.abs(term).max(initial=0) >= 2 ** 31:
        raise Unsupported("the int8 zero-point term overflows int32")
    return term.astype(np.int32)


def pointwise_weights(w) -> np.ndarray:
    """[oc, cin] int8 as ``gr_pointwise_s8`` reads it: cin zero-padded to a multiple of 4,
    each group of four stored (c0, c2, c1, c3) so SXTB16 yields the pairs (c0, c1), (c2, c3)."""
    a = w.numpy().reshape(w.shape[0], -1)
    out = np.zeros((a.shape[0], _round4(a.shape[1])), np.int8)
    out[:, :a.shape[1]] = a
    return np.ascontiguousarray(out.reshape(a.shape[0], -1, 4)[:, :, [0, 2, 1, 3]]).reshape(-1)


def fc_weights(w) -> np.ndarray:
    """[n, k] int8 as ``gr_fc_s8`` reads it, viewed as int32: columns in groups of four (a
    last group of 1-2 as a group of two, missing columns zero); per group, for each four k
    the four bytes of each column, then the k % 4 tail column after column, zero-padded to
    a whole word per column."""
    a = w.numpy().reshape(w.shape[0], -1)
    n, k = a.shape
    main, tail = k // 4 * 4, k % 4
    parts, j = [], 0
    while j < n:
        cols = 4 if n - j >= 3 else 2
        g = np.zeros((cols, k), np.int8)
        g[:min(cols, n - j)] = a[j:j + cols]
        parts.append(g[:, :main].reshape(cols, -1, 4).transpose(1, 0, 2).reshape(-1))
        if tail:
            t = np.zeros(cols * 4, np.int8)
            t[:cols * tail] = g[:, main:].reshape(-1)
            parts.append(t)
        j += min(cols, n - j)
    return np.concatenate(parts).view(np.int32)
