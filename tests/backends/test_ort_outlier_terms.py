"""Batch-1 outlier terms on ORT (``backends/ort_outlier_terms.py``): rows crowded with
outliers are cut into chunks (no row padded to the fullest), and layers that read the same
input share one term. The ORT output equals the torch graph within fp32 rounding, the file
keeps the stored form, and the per-call work is bounded by the outliers, not K x N."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gradrewrite.backends.ort import export_onnx
from gradrewrite.backends.ort_outlier_terms import OUTLIER_TERMS, chunk_width, fuse
from gradrewrite.compiler import run_pipeline
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.quant_ops import GROUPWISE_LINEAR


class SharedInput(torch.nn.Module):
    """q/k/v-like linears reading one input (one with a bias), then an output linear whose
    outliers crowd into two rows."""

    def __init__(self, k: int = 128, bias: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q = torch.nn.Linear(k, 64, bias=bias)
        self.k = torch.nn.Linear(k, 32, bias=False)
        self.v = torch.nn.Linear(k, 32, bias=False)
        self.o = torch.nn.Linear(128, 48, bias=False)
        with torch.no_grad():
            for lin in (self.q, self.k, self.v, self.o):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
            self.o.weight[3, :100] += 1.0            # two rows take most of o's outliers
            self.o.weight[40, 20:90] -= 1.0

    def forward(self, x):
        return self.o(torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1))


def _compile(tmp_path, model, k, spread, rows=1, outliers=0.05):
    graph = capture(model.eval(), (torch.randn(1, rows, k),))
    run_pipeline(graph, f"quantize(mode=weight-only,bits=4,group=32,outliers={outliers},"
                        f"criterion=magnitude,spread={spread})")
    path = tmp_path / "model.onnx"
    export_onnx(graph, path)
    return graph, path


def _session(path, optimized=None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if optimized:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _close(got, ref):
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("spread", ["layer", "rows", "cols"])   # rows: equal rows, padded (width 0)
@pytest.mark.parametrize("bias", [True, False])
def test_shared_input_one_term_equals_graph(tmp_path, spread, bias):
    graph, path = _compile(tmp_path, SharedInput(bias=bias), 128, spread)
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(3))
    _close(_session(path).run(None, {"x": x.numpy()})[0], graph(x)[0].detach().numpy())
    nodes = onnx.load(str(path)).graph.node
    gather = "GatherND" if spread == "cols" else "GatherElements"
    per_call = [n for n in nodes if n.op_type == gather and n.input[0] == "x"]
    assert len(per_call) == 1                       # q, k and v share one term of x
    # q, k and v run as one MatMulNBits (ort_sibling_linears) whose bias is the term
    # as it is: the only Split is the one of the wide output
    assert sum(n.op_type == "Split" for n in nodes) == 1
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert sorted(next(a.i for a in n.attribute if a.name == "N") for n in nbits) == [48, 128]
    assert all(len(n.input) == 6 and n.input[5] for n in nbits)


def test_view_equals_graph_and_leaves_it_untouched():
    """fuse() rewrites a view: the original graph keeps its outlier arguments, the view
    computes the same outputs (torch implementation of the fused op)."""
    graph = capture(SharedInput().eval(), (torch.randn(1, 1, 128),))
    run_pipeline(graph, "quantize(mode=weight-only,bits=4,group=32,outliers=0.05,criterion=magnitude)")
    before = graph.gm.code
    view, fused = fuse(graph)
    assert fused == 4 and graph.gm.code == before
    assert sum(n.target is OUTLIER_TERMS for n in view.graph.nodes) == 2      # x, and o's input
    assert all(n.args[5] is None for n in view.graph.nodes if n.target is GROUPWISE_LINEAR)
    assert all(n.args[5] is not None for n in graph.gm.graph.nodes if n.target is GROUPWISE_LINEAR)
    x = torch.randn(1, 1, 128)
    with torch.no_grad():
        torch.testing.assert_close(view(x)[0], graph(x)[0], rtol=1e-5, atol=1e-5)


def test_crowded_rows_are_chunked_not_padded(tmp_path):
    """o's outliers sit mostly in two rows: the term is built from chunks (a scatter onto
    rows), and the gathered indices ORT keeps after folding are far fewer than N x the
    fullest row."""
    graph, path = _compile(tmp_path, SharedInput(), 128, "layer")
    node = next(n for n in graph.call_nodes() if n.target == GROUPWISE_LINEAR and graph.attr(n.args[1]).shape[0] == 48)
    counts = graph.attr(node.args[7]).to(torch.int64)
    assert int(counts.max()) >= 8 * max(1, int(counts.float().mean()))       # crowded, as built
    w = chunk_width([counts])
    assert 0 < w < int(counts.max())
    opt = tmp_path / "optimized.onnx"
    _session(path, optimized=opt)
    model = onnx.load(str(opt))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = model.graph.node
    assert any(n.op_type == "ScatterElements" for n in nodes)
    gathers = [n for n in nodes if n.op_type == "GatherElements"]
    sizes = [int(np.prod(inits[n.input[1]].dims)) for n in gathers if n.input[1] in inits]
    nnz = int(counts.sum())
    assert sizes and min(sizes) <= 2 * nnz + len(counts) * w      # o's chunks, not 48 x fullest row
    assert all(s < 48 * int(counts.max()) for s in sizes)
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(9))
    _close(_session(path).run(None, {"x": x.numpy()})[0], graph(x)[0].detach().numpy())


def test_chunk_width_choice():
    even = [torch.full((512,), 5, dtype=torch.uint8)]
    assert chunk_width(even) == 0                             # equal rows: pad, no scatter
    crowded = torch.zeros(1536, dtype=torch.int64)
    crowded[:400] = 5
    crowded[7] = 500
    w = chunk_width([crowded])
    assert 1 <= w <= 16
    assert chunk_width([torch.zeros(8, dtype=torch.uint8)]) == 0


def test_prompt_rows_keep_the_dense_form(tmp_path):
    """More than one input row: no fused term (weights built at load, as before)."""
    graph, path = _compile(tmp_path, SharedInput(), 128, "layer", rows=4)
    view, fused = fuse(graph)
    assert fused == 0 and view is graph.gm
    x = torch.randn(1, 4, 128, generator=torch.Generator().manual_seed(2))
    _close(_session(path).run(None, {"x": x.numpy()})[0], graph(x)[0].detach().numpy())
