"""Quantized graphs as artifacts: torch (.pt2) and ONNX Runtime (QDQ int8 kernels,
MatMulNBits, weights built at session load), round trips and sizes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from examples.models import small_cnn, tiny_gpt
from gradrewrite.compiler import Artifact, CompileOptions, compile_graph, run_pipeline
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.registry import PassContext


@pytest.fixture(scope="module")
def gpt():
    model, (ids,) = tiny_gpt(vocab=128, d_model=64, n_layer=1, n_head=2, seq=16, tie_weights=False)
    return capture(model, (ids,))


def _compile(graph, tmp_path, backend, passes, calib=None):
    out = tmp_path / f"{backend}"
    compile_graph(graph.clone(), out, CompileOptions(passes=passes, backend=backend, calibration=calib,
                                                     latency_runs=0))
    return Artifact(out)


@pytest.mark.parametrize("bits", [3, 4])
def test_weight_only_artifacts_round_trip(gpt, tmp_path, bits):
    passes = f"quantize(bits={bits},group=32,outliers=0.02,criterion=magnitude)"
    q = gpt.clone()
    run_pipeline(q, passes)
    ids = gpt.random_inputs(3)[0]
    ref = q(ids)[0].numpy()
    torch_art = _compile(gpt, tmp_path, "torch", passes)
    np.testing.assert_array_equal(torch_art(ids)[0], ref)            # the same ops, bit for bit
    ort_art = _compile(gpt, tmp_path, "ort", passes)
    np.testing.assert_allclose(ort_art(ids)[0], ref, rtol=1e-4, atol=1e-4)
    model = onnx.load(str(ort_art.path / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    # 16 tokens with outliers: the weights are built in fp32 at session load from the stored
    # codes and outliers (decode-shaped MatMulNBits + sparse term: tests/backends/
    # test_ort_weight_only_fast.py); the file keeps the stored form
    assert "MatMul" in ops and "ScatterElements" in ops and "MatMulNBits" not in ops
    # the file holds the packed codes and outlier arrays, nothing nnz- or N*K-sized in int64
    inits = {t.name: t for t in model.graph.initializer}
    assert any(t.data_type == onnx.TensorProto.UINT8 and name.endswith("weight_packed")
               for name, t in inits.items())
    big64 = [n for n, t in inits.items() if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.BOOL)
             and np.prod(t.dims) > 200]
    assert not big64
    report = torch_art.report
    qrep = report["passes"][0]["report"]
    # codes + fp16 scale and packed zero per 32 weights + 2% outliers at 16+16 bits (+ row counts)
    assert bits + 0.5 + 0.02 * 32 < qrep["bits_per_weight"] < bits + 2.0
    assert report["verification"]["checked"] is False


def test_static_int8_runs_int8_kernels_in_ort(tmp_path):
    model, (x,) = small_cnn()
    graph = capture(model, (x,))
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(x.shape, generator=g),) for _ in range(4)]
    passes = "fold-bn,quantize"
    art = _compile(graph, tmp_path, "ort", passes, calib)
    path = art.path / "model.onnx"
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t.name for t in onnx.load(str(path)).graph.initializer
                    if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert len(int8_weights) == 6 and all(n.endswith("weight_int8") for n in int8_weights)  # 5 convs + fc
    # ORT fuses the QDQ pattern into integer kernels
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "QLinearConv" in fused
    # the int8 ORT model is close to the torch fake-quant graph (within a few output steps)
    q = graph.clone()
    res = run_pipeline(q, passes, ctx=PassContext(calibration=calib))
    step = res.records[-1].report["layers"][-1]["output"]["scale"]
    xin = torch.randn(x.shape, generator=g)
    assert np.abs(art(xin)[0] - q(xin)[0].numpy()).max() <= 3 * step
    torch_art = _compile(graph, tmp_path, "torch", passes, calib)
    np.testing.assert_array_equal(torch_art(xin)[0], q(xin)[0].numpy())
    rep = torch_art.report["passes"][1]["report"]
    assert rep["error_report"] and all(e["relative_error"] < 0.1 for e in rep["error_report"])
