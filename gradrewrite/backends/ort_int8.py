"""Static int8 Q/DQ graphs in the form ONNX Runtime fuses into integer kernels.

The quantize pass writes int8 activations (``quantize_per_tensor(..., -128, 127, torch.int8)``,
the graph contract the mcu and tvm backends share). ONNX Runtime's CPU kernels
(QLinearConv, QLinearMatMul, QGemm, QLinearAdd) run U8S8 -- uint8 activations, int8
weights -- on their VNNI / AMX paths. ORT's own ``QDQS8ToU8Transformer`` converts only a
QuantizeLinear with one DequantizeLinear consumer; a quantized value read by two layers
(every MobileNet/ResNet residual input) kept int8 while its neighbours became uint8, and a
node between a uint8 input and an int8 output cannot fuse: it ran as a float Conv / Add
between DequantizeLinear and QuantizeLinear. Measured on MobileNetV2-w0.35 @128 (ORT
1.32, 1 thread, ``optimized_model_filepath``): 42 of 52 convs and 0 of 10 adds fused
before, 52 of 52 convs after.

``activations_to_uint8`` rewrites every activation Q/DQ pair to uint8 with zero point
``z + 128``: ``q_u8 = q_s8 + 128`` for every value (rounding and clamping are the same
integers shifted), so the dequantized values -- and the float graph the session computes
-- are unchanged. Weights (DequantizeLinear of an int8 initializer) stay int8.

Linear layers: the exporter writes ``aten.linear`` as ``MatMul(x, Transpose(W)) + bias``.
ORT's QDQ selectors need a DequantizeLinear right at the MatMul, and its level-1
MatMul+Add fusion turns the pair into a Gemm whose float bias no QDQ rule takes: every
MiniLM linear ran as a float Gemm between DequantizeLinear nodes.
``transposed_weights`` stores ``W^T`` (the same int8 codes, per-channel axis swapped) so
the DequantizeLinear feeds the MatMul; ``integer_biases`` gives the bias as
``DequantizeLinear(round(b / (s_x s_w)), s_x s_w)`` in int32, the form ORT's conv fusion
builds for itself (a change of at most half a unit of the accumulator, s_x s_w / 2).
Then ORT runs QGemm (int8 x int8, int32 accumulation, float output where no quantize
follows): 36 of 36 MiniLM linears.

Convolutions with few input channels: ORT's x86 QLinearConv takes its symmetric indirect
kernel (MlasConvSym: int8 weights with zero point 0, requantization fused) only when the
input channels are a multiple of 4 and the output channels at least 16 in multiples of 8;
otherwise it runs im2col plus a generic U8S8 GEMM into an int32 buffer and requantizes in a
second pass. An image model's first conv (3 input channels) took that path: on
MobileNetV2-1.0 @224 (ORT 1.32, 1 thread, profiler medians) 0.70-0.74 ms, 15% of the int8
session, against 0.42-0.45 ms for the fp32 session's NCHWc conv. ``padded_conv_channels``
appends zero input channels up to a multiple of 4: a ``Pad`` of the quantized activation with
its zero point (which dequantizes to exactly 0.0) and zero weight columns, so every product
added is an exact zero; the conv then runs the symmetric kernel (0.37-0.40 ms, with the
uint8 ``Pad`` 0.04 ms).

Deep 1x1 convs on CPUs with AMX: the symmetric kernel is AVX-512 VNNI; ORT's generic QGEMM
path (taken when the weight zero point is not 0) has AMX tiles. For a pointwise conv with many
input channels and few pixels (MobileNetV2's projections from 384-960 channels at 14x14 and
7x7, and the 320 -> 1280 head) the GEMM path is faster; for the wide early layers (16-144
input channels, 56x56-112x112 pixels) it is 1.2-7x slower, and for depthwise convs 2x slower.
``gemm_path_pointwise`` stores such a conv's weights as ``w - 1`` with zero point -1 (codes in
[-127, 127] become [-128, 126]: the same dequantized values, exactly). Measured on
MobileNetV2-1.0 @224 (Sapphire Rapids, ORT 1.32): batch 1 session -1% to -3% at 1 and 2
threads, batch 8 about -1%. Applied only where ``/proc/cpuinfo`` lists ``amx_int8``: without
AMX the GEMM path has no such advantage (not measured here).
"""
from __future__ import annotations

from typing import Any

import numpy as np

_SHIFT = 128


def _const(value) -> np.ndarray | None:
    """The array behind an initializer or a Constant node's output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = node.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
    return None


def _int8_scalar(value) -> int | None:
    arr = _const(value)
    if arr is None or arr.dtype != np.int8 or arr.size != 1:
        return None
    return int(arr.reshape(()))


def _is(node, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx")


def activations_to_uint8(model, *, keep=None) -> dict[str, Any]:
    """Rewrite the int8 activation Q/DQ pairs of an ``onnx_ir`` model to uint8 (exact, see
    the module docstring); returns ``{"quantize": n, "dequantize": n, "kept_int8": n}``.
    ``keep(dequantize_nodes)``: True leaves that pair int8 (a backend's choice)."""
    import onnx_ir as ir

    graph = model.graph
    zero_points: dict[int, Any] = {}

    def u8_zero_point(z: int):
        if z not in zero_points:
            name = f"gr_u8_zero_point_{z + _SHIFT}"
            value = ir.Value(name=name, const_value=ir.tensor(np.array(z + _SHIFT, dtype=np.uint8), name=name))
            graph.register_initializer(value)
            zero_points[z] = value
        return zero_points[z]

    done = {"quantize": 0, "dequantize": 0, "kept_int8": 0}
    for node in list(graph):
        if not _is(node, "QuantizeLinear") or len(node.inputs) < 3 or "output_dtype" in node.attributes:
            continue
        z = _int8_scalar(node.inputs[2])
        if z is None:
            continue
        out = node.outputs[0]
        readers = [u.node for u in out.uses()]
        ok = (not out.is_graph_output() and readers
              and all(_is(r, "DequantizeLinear") and len(r.inputs) >= 3 and r.inputs[0] is out
                      and _int8_scalar(r.inputs[2]) == z for r in readers))
        if not ok or (keep is not None and keep(readers)):
            done["kept_int8"] += 1
            continue
        node.replace_input_with(2, u8_zero_point(z))
        out.dtype = ir.DataType.UINT8
        done["quantize"] += 1
        for r in dict.fromkeys(readers):
            r.replace_input_with(2, u8_zero_point(z))
            done["dequantize"] += 1
    return done


def _unique(graph, name: str) -> str:
    """``name``, or ``name_<n>`` when an initializer of that name exists (one stored value
    can be read by several nodes, each rewritten on its own)."""
    base, n = name, 0
    while name in graph.initializers:
        n += 1
        name = f"{base}_{n}"
    return name


def _uses(value) -> list:
    return [u.node for u in value.uses()]


def transposed_weights(model) -> int:
    """``Transpose(DequantizeLinear(W_int8, s, z, axis=a), perm=[1, 0])`` -> a
    DequantizeLinear of the stored ``W_int8^T`` along axis ``1 - a`` (exact)."""
    import onnx_ir as ir

    graph, count = model.graph, 0
    for node in list(graph):
        if not _is(node, "Transpose"):
            continue
        perm = node.attributes.get("perm")
        dq = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        if perm is None or list(perm.as_ints()) != [1, 0] or not _is(dq, "DequantizeLinear"):
            continue
        w = _const(dq.inputs[0])
        if (w is None or w.dtype != np.int8 or w.ndim != 2 or len(_uses(dq.outputs[0])) != 1
                or dq.inputs[0].is_graph_input() or dq.outputs[0].is_graph_output()):
            continue
        axis = dq.attributes.get("axis")
        axis = axis.as_int() if axis is not None else 1
        name = _unique(graph, f"{dq.inputs[0].name}_t")
        wt = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(w.T), name=name))
        graph.register_initializer(wt)
        new = ir.Node("", "DequantizeLinear", [wt, *dq.inputs[1:]],
                      attributes=[ir.AttrInt64("axis", 1 - (axis % 2))], name=f"{dq.name}_t")
        graph.insert_before(node, new)
        new.outputs[0].dtype = node.outputs[0].dtype
        new.outputs[0].shape = node.outputs[0].shape
        ir.convenience.replace_all_uses_with(node.outputs[0], new.outputs[0])
        if node.outputs[0].is_graph_output():
            continue
        graph.remove(node, safe=True)
        graph.remove(dq, safe=True)
        count += 1
    return count


def integer_biases(model) -> int:
    """``Add(MatMul(DequantizeLinear(x), DequantizeLinear(W)), b)`` with a stored 1-D ``b``:
    ``b`` becomes ``DequantizeLinear(int32 round(b / (s_x s_w)), s_x s_w)``."""
    import onnx_ir as ir

    graph, count = model.graph, 0
    for add in list(graph):
        if not _is(add, "Add") or len(add.inputs) != 2:
            continue
        for i in (0, 1):
            mm, bias = add.inputs[i].producer(), add.inputs[1 - i]
            if not _is(mm, "MatMul") or len(_uses(mm.outputs[0])) != 1 or mm.outputs[0].is_graph_output():
                continue
            dx, dw = (v.producer() for v in mm.inputs)
            b = _const(bias)
            if not (_is(dx, "DequantizeLinear") and _is(dw, "DequantizeLinear") and b is not None
                    and b.ndim == 1 and b.dtype == np.float32):
                continue
            sx, sw = _const(dx.inputs[1]), _const(dw.inputs[1])
            if sx is None or sw is None or sx.size != 1 or sw.size not in (1, b.size):
                continue
            scale = (sx.astype(np.float64).reshape(()) * sw.astype(np.float64).reshape(-1)).astype(np.float32)
            scale = np.broadcast_to(scale, b.shape).copy()
            scale[scale == 0] = 1.0
            q = np.round(b.astype(np.float64) / scale)
            if np.abs(q).max(initial=0) >= 2 ** 31:
                continue
            name, sname = _unique(graph, f"{bias.name}_int32"), _unique(graph, f"{bias.name}_int32_scale")
            qv = ir.Value(name=name, const_value=ir.tensor(q.astype(np.int32), name=name))
            sv = ir.Value(name=sname, const_value=ir.tensor(scale, name=sname))
            graph.register_initializer(qv)
            graph.register_initializer(sv)
            dq = ir.Node("", "DequantizeLinear", [qv, sv], attributes=[ir.AttrInt64("axis", 0)],
                         name=f"{add.name}_bias_dq")
            graph.insert_before(add, dq)
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = ir.Shape(list(b.shape))
            add.replace_input_with(1 - i, dq.outputs[0])
            count += 1
            break
    return count


_CHANNEL_ALIGN = 4         # MlasConvSym: input channels in multiples of 4 (x86 and Arm)
_MIN_OUT_CHANNELS, _OUT_ALIGN = 16, 8   # output channels: >= 16, multiples of 8 (AVX2; 4 on AVX-512)


def _int_attr(node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _zero_point(dq) -> np.ndarray | None:
    """A DequantizeLinear's stored zero point (zeros when it has none), None when not stored."""
    if len(dq.inputs) < 3 or dq.inputs[2] is None:
        return np.zeros(1, dtype=np.int8)
    return _const(dq.inputs[2])


def _take_name(graph, old, new) -> None:
    """``new`` (an initializer replacing ``old``) takes ``old``'s name when nothing reads
    ``old`` any more, which then leaves the file (no stale copy of a weight)."""
    if (old.uses() or old.is_graph_output() or old.is_graph_input()
            or graph.initializers.get(old.name) is not old):
        return
    graph.initializers.pop(old.name)
    new.name = old.name


def padded_conv_channels(model) -> int:
    """``Conv(DequantizeLinear(x_q), DequantizeLinear(W_int8))`` with ``C % 4 != 0`` input
    channels (``group == 1``, symmetric weights, output channels the symmetric kernel takes):
    ``x_q`` padded along axis 1 with its zero point, ``W`` with zero input channels, up to a
    multiple of 4 (exact: each added product is ``0.0 * 0.0``). Returns how many convs."""
    import onnx_ir as ir

    graph, count = model.graph, 0
    for conv in list(graph):
        if not _is(conv, "Conv") or _int_attr(conv, "group", 1) != 1 or len(conv.inputs) < 2:
            continue
        dx, dw = (v.producer() if v is not None else None for v in conv.inputs[:2])
        if not (_is(dx, "DequantizeLinear") and _is(dw, "DequantizeLinear")):
            continue
        w, x_zp, w_zp = _const(dw.inputs[0]), _zero_point(dx), _zero_point(dw)
        shape = dx.inputs[0].shape
        if (w is None or w.dtype != np.int8 or w.ndim < 3 or w.shape[1] % _CHANNEL_ALIGN == 0
                or w.shape[0] < _MIN_OUT_CHANNELS or w.shape[0] % _OUT_ALIGN
                or w_zp is None or np.any(w_zp != 0) or x_zp is None or x_zp.size != 1
                or shape is None or len(shape) != w.ndim or shape[1] != w.shape[1]
                or dx.inputs[0].dtype not in (ir.DataType.UINT8, ir.DataType.INT8)):
            continue
        channels = -(-w.shape[1] // _CHANNEL_ALIGN) * _CHANNEL_ALIGN
        wp = np.zeros((w.shape[0], channels, *w.shape[2:]), dtype=np.int8)
        wp[:, :w.shape[1]] = w
        wname, pname = _unique(graph, f"{dw.inputs[0].name}_padded"), _unique(graph, f"{conv.name}_channel_pads")
        pads = np.zeros(2 * w.ndim, dtype=np.int64)
        pads[w.ndim + 1] = channels - w.shape[1]
        wv = ir.Value(name=wname, const_value=ir.tensor(wp, name=wname))
        pv = ir.Value(name=pname, const_value=ir.tensor(pads, name=pname))
        graph.register_initializer(wv)
        graph.register_initializer(pv)
        pad_inputs = [dx.inputs[0], pv] + ([dx.inputs[2]] if len(dx.inputs) >= 3 and dx.inputs[2] is not None else [])
        pad = ir.Node("", "Pad", pad_inputs, attributes=[ir.AttrString("mode", "constant")], name=f"{conv.name}_channel_pad")
        new_dx = ir.Node("", "DequantizeLinear", [pad.outputs[0], *dx.inputs[1:]],
                         attributes=list(dx.attributes.values()), name=f"{conv.name}_padded_dq")
        new_dw = ir.Node("", "DequantizeLinear", [wv, *dw.inputs[1:]],
                         attributes=list(dw.attributes.values()), name=f"{conv.name}_padded_weight_dq")
        for node in (pad, new_dx, new_dw):
            graph.insert_before(conv, node)
        padded = ir.Shape([shape[0], channels, *list(shape)[2:]])
        pad.outputs[0].dtype, pad.outputs[0].shape = dx.inputs[0].dtype, padded
        new_dx.outputs[0].dtype, new_dx.outputs[0].shape = dx.outputs[0].dtype, padded
        new_dw.outputs[0].dtype, new_dw.outputs[0].shape = dw.outputs[0].dtype, ir.Shape(list(wp.shape))
        conv.replace_input_with(0, new_dx.outputs[0])
        conv.replace_input_with(1, new_dw.outputs[0])
        stored = dw.inputs[0]
        for old in (dx, dw):
            if not _uses(old.outputs[0]) and not old.outputs[0].is_graph_output():
                graph.remove(old, safe=True)
        _take_name(graph, stored, wv)
        count += 1
    return count


GEMM_PATH_MIN_CHANNELS = 320


def has_amx_int8() -> bool:
    """Whether this machine's CPU lists AMX int8 (Linux ``/proc/cpuinfo``; False elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and "amx_int8" in line.split() for line in f)
    except OSError:
        return False


def _unit_strides_no_pads(conv) -> bool:
    strides, pads = conv.attributes.get("strides"), conv.attributes.get("pads")
    auto_pad = conv.attributes.get("auto_pad")
    return ((strides is None or all(v == 1 for v in strides.as_ints()))
            and (pads is None or not any(pads.as_ints()))
            and (auto_pad is None or auto_pad.as_string() in ("NOTSET", "VALID")))


def gemm_path_pointwise(model, min_channels: int = GEMM_PATH_MIN_CHANNELS) -> int:
    """1x1 ``Conv`` (``group == 1``, stride 1, no padding) of ``DequantizeLinear(W_int8, s, 0)``
    with at least ``min_channels`` input channels: ``W`` stored as ``W - 1`` with zero point -1
    (exact for codes in [-127, 127]), which sends ORT's QLinearConv to its GEMM path. Returns
    how many."""
    import onnx_ir as ir

    graph, count = model.graph, 0
    for conv in list(graph):
        if not _is(conv, "Conv") or _int_attr(conv, "group", 1) != 1 or len(conv.inputs) < 2 or conv.inputs[1] is None:
            continue
        if not _unit_strides_no_pads(conv):     # measured for those; others need ORT's im2col
            continue
        dw = conv.inputs[1].producer()
        if not _is(dw, "DequantizeLinear") or len(dw.inputs) < 3 or dw.inputs[2] is None:
            continue
        w, zp = _const(dw.inputs[0]), _const(dw.inputs[2])
        if (w is None or w.dtype != np.int8 or w.ndim < 3 or any(k != 1 for k in w.shape[2:])
                or w.shape[1] < min_channels or zp is None or zp.dtype != np.int8 or np.any(zp != 0)
                or w.min(initial=0) < -127 or len(_uses(dw.outputs[0])) != 1):
            continue
        wname, zname = _unique(graph, f"{dw.inputs[0].name}_zp_m1"), _unique(graph, f"{dw.inputs[0].name}_zero_point_m1")
        wv = ir.Value(name=wname, const_value=ir.tensor((w.astype(np.int16) - 1).astype(np.int8), name=wname))
        zv = ir.Value(name=zname, const_value=ir.tensor(np.full(zp.shape, -1, dtype=np.int8), name=zname))
        graph.register_initializer(wv)
        graph.register_initializer(zv)
        stored, stored_zp = dw.inputs[0], dw.inputs[2]
        dw.replace_input_with(0, wv)
        dw.replace_input_with(2, zv)
        _take_name(graph, stored, wv)
        _take_name(graph, stored_zp, zv)
        count += 1
    return count


def ort_form(model, *, amx: bool | None = None) -> dict[str, Any]:
    """All the rewrites (the uint8 one before the channel padding, whose ``Pad`` reads a
    quantized value: ``activations_to_uint8`` converts only values read by DequantizeLinear
    nodes); the counts for the report. ``amx``: whether deep 1x1 convs take ORT's GEMM path
    (``gemm_path_pointwise``); None asks this machine's CPU."""
    done = {"linear_weights_transposed": transposed_weights(model),
            "integer_biases": integer_biases(model), **activations_to_uint8(model)}
    done["conv_channels_padded"] = padded_conv_channels(model)
    done["pointwise_gemm_path"] = gemm_path_pointwise(model) if (has_amx_int8() if amx is None else amx) else 0
    return done


__all__ = ["activations_to_uint8", "transposed_weights", "integer_biases", "padded_conv_channels",
           "gemm_path_pointwise", "has_amx_int8", "ort_form"]
