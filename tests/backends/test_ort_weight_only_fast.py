"""ORT artifacts of weight-only layers: the file keeps the stored form (codes at their own
width, 16-bit outlier columns, 8-bit row counts) and equals the torch graph within fp32
rounding for 2/3/4/8 bits, with and without outliers, K off the group grid, wide K."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gradrewrite.backends.ort import export_onnx
from gradrewrite.compiler import run_pipeline
from gradrewrite.errors import ConfigError
from gradrewrite.backends.options import make_options
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.quant_ops import GROUPWISE_LINEAR

T = onnx.TensorProto


class Net(torch.nn.Module):
    def __init__(self, k: int, n: int = 24):
        super().__init__()
        g = torch.Generator().manual_seed(k)
        self.fc = torch.nn.Linear(k, n)
        self.out = torch.nn.Linear(n, 8, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
            self.fc.weight[1, 3] = 2.0                     # a clear outlier
            self.out.weight.copy_(torch.randn(8, n, generator=g) * 0.2)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


def _artifact(tmp_path, k: int, passes: str, rows: int = 3, model=None, **export):
    graph = capture((model or Net(k)).eval(), (torch.randn(rows, k),))
    run_pipeline(graph, passes)
    path = tmp_path / "model.onnx"
    export_onnx(graph, path, **export)
    return graph, path


def _run(path, x):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _fp32_close(got, ref):
    # fp32 rounding of a K-term dot product, relative to the output's scale
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("outliers,rows,spread", [(0.0, 3, "layer"), (0.02, 1, "layer"), (0.02, 3, "layer"),
                                                  (0.02, 1, "cols"), (0.02, 3, "cols")])
def test_ort_equals_torch_graph(tmp_path, bits, outliers, rows, spread):
    """rows=1: the decode form (MatMulNBits + sparse or column term); rows=3: fp32 weights
    built at load."""
    k = 200                                                  # not a multiple of the group
    passes = (f"quantize(mode=weight-only,bits={bits},group=32,outliers={outliers},criterion=magnitude,"
              f"spread={spread})")
    graph, path = _artifact(tmp_path, k, passes, rows=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(5))
    _fp32_close(_run(path, x), graph(x)[0].numpy())


def test_file_holds_stored_widths(tmp_path):
    """3-bit codes stay 3-bit in the file (widened only at session load), outlier columns
    are int16 and row counts uint8; no int64 / fp32 copy of anything weight-sized."""
    k = 200
    graph, path = _artifact(tmp_path, k, "quantize(mode=weight-only,bits=3,group=32,outliers=0.02,"
                                         "criterion=magnitude)", rows=1)
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    packed = next(t for n, t in inits.items() if n.endswith("fc.weight_packed"))
    assert packed.data_type == T.UINT8 and list(packed.dims) == [24, 7, 32 * 3 // 8]
    cols = next(t for n, t in inits.items() if n.endswith("fc.weight_outlier_cols"))
    counts = next(t for n, t in inits.items() if n.endswith("fc.weight_outlier_counts"))
    assert cols.data_type == T.INT16 and counts.data_type == T.UINT8 and list(counts.dims) == [24]
    big = [n for n, t in inits.items() if t.data_type in (T.INT64, T.INT32, T.FLOAT) and np.prod(t.dims) > 64
           and "bias" not in n]
    assert not big
    assert not any(n.domain.startswith("gradrewrite") for n in model.graph.node)   # markers resolved
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx", "com.microsoft"}
    # the stored codes are the graph's own
    node = next(n for n in graph.call_nodes() if n.target == GROUPWISE_LINEAR)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(packed), graph.attr(node.args[1]).numpy())


def test_session_widens_at_load(tmp_path):
    """After ORT's load-time folding, no unpacking runs per call: the optimized graph has
    4-bit MatMulNBits and no bit operations."""
    _, path = _artifact(tmp_path, 64, "quantize(mode=weight-only,bits=3,group=32,outliers=0.02,"
                                      "criterion=magnitude)", rows=1)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    ops = [n.op_type for n in optimized.graph.node]
    assert ops.count("MatMulNBits") == 2 and not {"BitShift", "BitwiseAnd", "CumSum", "Range"} & set(ops)
    assert {a.i for n in optimized.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"} == {4}


def test_wide_layer_int32_columns(tmp_path):
    """K > 65536: columns past 16 bits are stored as int32 and still exact on ORT."""
    k = 65536 + 40
    model = Net(k)
    with torch.no_grad():
        model.fc.weight[2, k - 1] = 3.0                # an outlier past column 65535
    graph, path = _artifact(tmp_path, k, "quantize(mode=weight-only,bits=4,group=64,outliers=0.001,"
                                         "criterion=magnitude)", rows=1, model=model)
    node = next(n for n in graph.call_nodes() if n.target == GROUPWISE_LINEAR
                and graph.attr(n.args[1]).shape[0] == 24)
    cols = graph.attr(node.args[6])
    assert cols.dtype == torch.int32 and int(cols.max()) == k - 1
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(2))
    _fp32_close(_run(path, x), graph(x)[0].numpy())


def test_accuracy_level_is_opt_in(tmp_path):
    assert make_options("ort", {}).nbits_accuracy_level == 0
    with pytest.raises(ConfigError):
        make_options("ort", {"nbits_accuracy_level": 7})
    graph, path = _artifact(tmp_path, 128, "quantize(mode=weight-only,bits=4,group=32)", nbits_accuracy_level=4)
    model = onnx.load(str(path))
    assert {a.i for n in model.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "accuracy_level"} == {4}
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    ref = graph(x)[0].numpy()                      # int8 activations: close, not fp32-exact
    np.testing.assert_allclose(_run(path, x), ref, rtol=0, atol=0.05 * float(np.abs(ref).max()))


@pytest.mark.parametrize("spread", ["layer", "rows"])
def test_decode_term_feeds_matmulnbits_bias(tmp_path, spread):
    """At one input row the outliers' term goes into MatMulNBits' bias input: per call a
    GatherElements, a Mul and a ReduceSum, and no Add after the kernel (the layer's bias is
    added to the term instead)."""
    passes = f"quantize(mode=weight-only,bits=4,group=32,outliers=0.03,criterion=magnitude,spread={spread})"
    graph, path = _artifact(tmp_path, 96, passes, rows=1)
    x = torch.randn(1, 96)
    with torch.no_grad():
        _fp32_close(_run(path, x), graph(x)[0].numpy())
    nodes = onnx.load(str(path)).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all(len(n.input) == 6 and n.input[5] for n in nbits)
    assert sum(n.op_type == "GatherElements" for n in nodes) == 2
    produced_by = {o: n for n in nodes for o in n.output}
    consumers = [n for n in nodes for i in n.input if any(i == m.output[0] for m in nbits)]
    assert all(c.op_type != "Add" for c in consumers)
    # rows padded to the longest (ReduceSum, + Add for a bias), or chunks scattered onto rows
    assert produced_by[nbits[0].input[5]].op_type in ("ReduceSum", "Add", "ScatterElements")


def test_column_outliers_store_no_counts_and_gather_once(tmp_path):
    """spread=cols: the file holds fp16 [N, c] values and c int16 columns (no row counts);
    at one input row the term is a Gather of c inputs and a small MatMul into MatMulNBits'
    bias, and the session runs no per-element gather of weights."""
    k = 128
    passes = "quantize(mode=weight-only,bits=4,group=32,outliers=0.03,criterion=magnitude,spread=cols)"
    graph, path = _artifact(tmp_path, k, passes, rows=1)
    node = next(n for n in graph.call_nodes() if n.target == GROUPWISE_LINEAR
                and graph.attr(n.args[1]).shape[0] == 24)
    c = round(0.03 * k)
    assert tuple(graph.attr(node.args[5]).shape) == (24, c) and node.args[7] is None
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    vals = next(t for n, t in inits.items() if n.endswith("fc.weight_outlier_values"))
    cols = next(t for n, t in inits.items() if n.endswith("fc.weight_outlier_cols"))
    assert vals.data_type == T.FLOAT16 and list(vals.dims) == [24, c]
    assert cols.data_type == T.INT16 and list(cols.dims) == [c]
    assert not any(n.endswith("outlier_counts") for n in inits)
    nodes = model.graph.node
    assert not any(n.op_type == "GatherElements" for n in nodes)
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all(len(n.input) == 6 and n.input[5] for n in nbits)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(4))
    _fp32_close(_run(path, x), graph(x)[0].numpy())


def test_column_outliers_bits_per_weight():
    """Whole columns cost 16 bits per outlier plus 16 per column: less than compressed rows."""
    from gradrewrite.passes.quantize.outliers import top_k_mask
    from gradrewrite.passes.quantize.weight_only import quantize_groupwise

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    score = w.abs()
    by_cols = quantize_groupwise(w, 4, 64, top_k_mask(score, 0.02, "cols")).storage_bits()
    by_rows = quantize_groupwise(w, 4, 64, top_k_mask(score, 0.02, "rows")).storage_bits()
    c = round(0.02 * 256)
    assert by_cols["outlier_values"] == 64 * c * 16 and by_cols["outlier_cols"] == c * 16
    assert by_cols["outlier_rows"] == 0
    assert sum(by_cols.values()) < sum(by_rows.values())
    q = quantize_groupwise(w, 4, 64, top_k_mask(score, 0.02, "cols"))
    kept = top_k_mask(score, 0.02, "cols")
    torch.testing.assert_close(q.dequantized()[kept], w[kept].half().float())
