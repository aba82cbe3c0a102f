"""A tied embedding and LM head read one tensor in the ORT artifact
(``backends/ort_tied_weights.py``): the head is ``FusedMatMul(h, W, transB=1)`` on the
Gather's own initializer, with no Transpose left for ORT to fold into a second copy; the
output equals the torch graph; the OpenVINO route keeps standard ONNX."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gradrewrite.backends.ort import export_onnx, make_session
from gradrewrite.rewrite.capture import capture
from tests.model_zoo import hf_gpt2


def _export(tmp_path, form, **kw):
    model, inputs = hf_gpt2(seq=8)
    graph = capture(model, inputs)
    path = tmp_path / "model.onnx"
    facts = export_onnx(graph, path, qdq_form=form, **kw)
    return graph, inputs, path, facts


def _table_readers(path):
    """The token table (the initializer the largest Gather reads) and the nodes reading it."""
    m = onnx.load(str(path), load_external_data=False)
    sizes = {i.name: int(np.prod(i.dims)) for i in m.graph.initializer}
    table = max((n.input[0] for n in m.graph.node if n.op_type == "Gather" and n.input[0] in sizes), key=sizes.get)
    return table, [n for n in m.graph.node if table in n.input]


@pytest.mark.parametrize("external", [False, True])
def test_tied_head_reads_the_table_in_place(tmp_path, external):
    graph, inputs, path, facts = _export(tmp_path, "ort", external_data=external)
    table, readers = _table_readers(path)
    assert sorted(n.op_type for n in readers) == ["FusedMatMul", "Gather"]
    head = next(n for n in readers if n.op_type == "FusedMatMul")
    assert head.domain == "com.microsoft" and {a.name: a.i for a in head.attribute}["transB"] == 1
    assert facts["weights_read_transposed"] == 1
    ref = graph(*inputs)[0].detach().numpy()
    for prepack in (True, False):
        sess = make_session(path, prepack=prepack)
        got = sess.run(None, {sess.get_inputs()[0].name: inputs[0].numpy()})[0]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def test_openvino_route_keeps_standard_onnx(tmp_path):
    _, _, path, facts = _export(tmp_path, "as-is")
    _, readers = _table_readers(path)
    assert sorted(n.op_type for n in readers) == ["Gather", "Transpose"]
    assert "weights_read_transposed" not in facts
    assert all(o.domain in ("", "ai.onnx") for o in onnx.load(str(path)).opset_import if o.version)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
