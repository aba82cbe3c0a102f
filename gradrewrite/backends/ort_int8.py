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


def activations_to_uint8(model) -> dict[str, Any]:
    """Rewrite the int8 activation Q/DQ pairs of an ``onnx_ir`` model to uint8 (exact, see
    the module docstring); returns ``{"quantize": n, "dequantize": n, "kept_int8": n}``."""
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
        if not ok:
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


def ort_form(model) -> dict[str, Any]:
    """All three rewrites; the counts for the report."""
    return {"linear_weights_transposed": transposed_weights(model),
            "integer_biases": integer_biases(model), **activations_to_uint8(model)}


__all__ = ["activations_to_uint8", "transposed_weights", "integer_biases", "ort_form"]
