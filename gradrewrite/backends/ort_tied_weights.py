"""A weight read by two ops stays one tensor in the ONNX Runtime session.

A tied LM head exports as ``MatMul(h, Transpose(W))`` next to ``Gather(W, ids)``. ORT's
constant folding turns ``Transpose(W)`` into a second initializer (``W`` must stay for the
Gather), and prepacking the MatMul's ``B`` makes yet another copy: the table (a quarter of
Qwen2-0.5B) is held twice. ``com.microsoft.FusedMatMul(h, W, transB=1)`` reads ``W`` as it
is, so nothing is left to fold; with prepacking off (``make_session(prepack=False)``, what
the ORT backend does for models whose weights live in an external data file) the session
holds the table once.
"""
from __future__ import annotations

MS_DOMAIN = "com.microsoft"


def _transpose_of_initializer(value):
    """The ``Transpose(W, perm=[1, 0])`` node producing ``value``, ``W`` an initializer; else None."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    perm = node.attributes.get("perm")
    w = node.inputs[0]
    if perm is None or list(perm.as_ints()) != [1, 0] or w is None or w.const_value is None or w.is_graph_input():
        return None
    return node


def read_in_place(model) -> int:
    """``MatMul(A, Transpose(W))`` with ``W`` an initializer -> ``FusedMatMul(A, W,
    transB=1)`` (exact: the same products, B read transposed); returns how many."""
    import onnx_ir as ir

    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        transpose = _transpose_of_initializer(node.inputs[1])
        if transpose is None:
            continue
        fused = ir.Node(MS_DOMAIN, "FusedMatMul", [node.inputs[0], transpose.inputs[0]],
                        attributes=[ir.AttrInt64("transA", 0), ir.AttrInt64("transB", 1),
                                    ir.AttrFloat32("alpha", 1.0)], name=f"{node.name}_fused")
        graph.insert_before(node, fused)
        out, name = node.outputs[0], node.outputs[0].name
        fused.outputs[0].dtype, fused.outputs[0].shape = out.dtype, out.shape
        ir.convenience.replace_all_uses_with(out, fused.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        fused.outputs[0].name = name                   # a graph output keeps its name
        if not transpose.outputs[0].uses() and not transpose.outputs[0].is_graph_output():
            graph.remove(transpose, safe=True)
        count += 1
    if count:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return count


__all__ = ["read_in_place"]
