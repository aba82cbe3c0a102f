"""Static int8 through the ort backend: the graph ORT actually runs (its optimized model)
has integer kernels for every conv (depthwise included) and residual add, the uint8
activation rewrite is exact, and the outputs match the fake-quant graph within
quantization steps."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch import nn

import gradrewrite as gr
from gradrewrite.backends.options import make_options
from gradrewrite.compiler import CompileOptions, compile_graph
from gradrewrite.errors import ConfigError
from gradrewrite.rewrite.quant_ops import DEQUANTIZE_PER_TENSOR
from gradrewrite.rewrite.registry import PassContext

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


class Block(nn.Module):
    """MobileNetV2's inverted residual: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 project, add."""

    def __init__(self, ch: int, hidden: int):
        super().__init__()
        self.expand = nn.Conv2d(ch, hidden, 1)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, ch, 1)

    def forward(self, x):
        return x + self.project(torch.nn.functional.relu6(self.dw(torch.nn.functional.relu6(self.expand(x)))))


class ResidualCNN(nn.Module):
    """stem conv, two chained residual blocks (the second add reads the first add's sum),
    max pool, a conv, global average pool, linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.b1, self.b2 = Block(16, 48), Block(16, 48)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = self.b2(self.b1(torch.relu(self.stem(x))))
        y = torch.relu(self.conv(torch.nn.functional.max_pool2d(y, 2)))
        return self.fc(y.mean((2, 3)))


CONVS, ADDS = 8, 2   # stem, 2 x (expand, dw, project), conv


def _calib(n=8):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(1, 3, 32, 32, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def quantized():
    graph = gr.capture(ResidualCNN().eval(), (torch.randn(1, 3, 32, 32),))
    res = gr.run_pipeline(graph, "quantize(mode=static)", verify=False, ctx=PassContext(calibration=_calib()))
    return graph, res.records[-1].report


@pytest.fixture(scope="module")
def artifacts(quantized, tmp_path_factory):
    graph, _ = quantized
    out = {}
    for act in ("ort", "as-is"):
        out[act] = compile_graph(graph.clone(), tmp_path_factory.mktemp(act) / "art",
                                 CompileOptions(backend="ort", latency_runs=0, rel_tol=0.05,
                                                backend_options={"qdq_form": act}))
    return out


def _session(path, *, optimized=None, level=None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    if level is not None:
        opts.graph_optimization_level = level
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _ops_ort_runs(art, tmp_path) -> tuple[collections.Counter, list]:
    opt = tmp_path / "optimized.onnx"
    _session(art.path / "model.onnx", optimized=opt)
    model = onnx.load(str(opt))
    return collections.Counter(n.op_type for n in model.graph.node), list(model.graph.node)


def test_every_residual_add_reads_quantized_values(quantized):
    graph, report = quantized
    adds = [n for n in graph.call_nodes() if n.target == torch.ops.aten.add.Tensor]
    assert len(adds) == ADDS
    for add in adds:
        assert all(a.target == DEQUANTIZE_PER_TENSOR for a in add.args)
    # the first sum feeds b2's expand conv (quantized there) and b2's add: the add now reads
    # that quantized value too
    assert report["rewrites"]["add-output-reused"] == 1


def test_ort_runs_integer_convs_and_adds(artifacts, tmp_path):
    ops, nodes = _ops_ort_runs(artifacts["ort"], tmp_path)
    assert ops["QLinearConv"] == CONVS and ops["QLinearAdd"] == ADDS
    assert not ops["Conv"] and not ops["Add"] and not ops["MatMul"] and not ops["Gemm"]
    assert ops["QGemm"] == 1                                           # the linear head
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in nodes if n.op_type == "QLinearConv"]
    assert sorted(groups)[-2:] == [48, 48]                            # the depthwise convs
    # the only float islands: the input's quantize, global average pool (ReduceMean), the output
    assert ops["QuantizeLinear"] <= 2 and ops["DequantizeLinear"] <= 2
    facts = artifacts["ort"].report["artifact"]["qdq_form"]
    assert facts["kept_int8"] == 0 and facts["quantize"] > 0


def test_int8_activations_leave_convs_float(artifacts, tmp_path):
    """What the uint8 rewrite fixes: with the pass's int8 activations ORT converts only
    Q/DQ pairs with one reader, and the layers between mixed types stay float."""
    ops, _ = _ops_ort_runs(artifacts["as-is"], tmp_path)
    assert ops["Conv"] + ops["Add"] > 0
    assert "qdq_form" not in artifacts["as-is"].report["artifact"]


def test_uint8_rewrite_is_exact(artifacts):
    """Without ORT's fusions the session computes the Q/DQ float graph: uint8 and int8
    activations give bit-identical outputs."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(11)).numpy()
    outs = []
    for act in ("ort", "as-is"):
        s = _session(artifacts[act].path / "model.onnx", level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        outs.append(s.run(None, {s.get_inputs()[0].name: x})[0])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_integer_kernels_match_the_fake_quant_graph(quantized, artifacts):
    """ORT's integer kernels requantize with float multipliers where the graph rounds the
    float result: a value can land one step away, and a flip early on moves later layers by
    a step or so; the output stays within a few steps of the head's output scale."""
    graph, report = quantized
    step = next(l for l in report["layers"] if l["path"] == "fc")["output"]["scale"]
    s = _session(artifacts["ort"].path / "model.onnx")
    steps = []
    for seed in (21, 22, 23):
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
        ref = graph(x)[0].detach().numpy()
        steps.append(np.abs(got - ref) / step)
    steps = np.concatenate([d.ravel() for d in steps])
    assert steps.max() <= 4.0
    assert (steps <= 1.0 + 1e-3).mean() >= 0.8


def test_qdq_form_option_is_validated():
    with pytest.raises(ConfigError, match="qdq_form"):
        make_options("ort", {"qdq_form": "uint4"})
    assert make_options("ort", {}).qdq_form == "ort"


class Encoder(nn.Module):
    """A post-LN transformer layer with an outlier channel in its norm's output."""

    def __init__(self, d: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(d)
        with torch.no_grad():
            self.norm.weight[3] = 40.0                  # one channel ~40x the others
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.qkv(h).chunk(3, -1)
        a = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1),
                                                             v.unsqueeze(1)).squeeze(1)
        h = self.norm2(h + self.out(a))
        return h + self.down(torch.nn.functional.gelu(self.up(h)))


def test_transformer_linears_run_qgemm(tmp_path):
    """Linear layers (MatMul + Add after export) reach ORT as QGemm: weights stored for the
    MatMul, int32 bias; their outputs, read by attention / GELU / residual adds, stay float."""
    g = torch.Generator().manual_seed(4)
    calib = [(torch.randn(1, 16, 32, generator=g),) for _ in range(4)]
    graph = gr.capture(Encoder().eval(), calib[0])
    res = gr.run_pipeline(graph, "quantize(mode=static,outputs=auto)", verify=False,
                          ctx=PassContext(calibration=calib))
    rewrites = res.records[-1].report["rewrites"]
    assert rewrites["output-float"] == 4 and rewrites["output-qdq"] == 0
    art = compile_graph(graph, tmp_path / "enc", CompileOptions(backend="ort", latency_runs=0, rel_tol=0.05))
    ops, _ = _ops_ort_runs(art, tmp_path)
    assert ops["QGemm"] + ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] == 4
    assert not ops["Gemm"]
    assert art.report["artifact"]["qdq_form"]["integer_biases"] == 4
    # int8 x int8 GEMMs with float outputs: against the fake-quant graph, the only difference
    # is fp32 summation order and the bias rounded to s_x s_w / 2 at most
    x = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(9))
    got, = art(x.numpy())
    ref = graph(x)[0].detach().numpy()
    assert np.linalg.norm(got - ref) <= 1e-3 * np.linalg.norm(ref)


def test_tiny_gpt_linears_run_qgemm(tmp_path):
    """GPT blocks (a stored bias read by two ONNX nodes after export: each rewrite gets its
    own int32 copy) reach ORT with every quantized linear as QGemm."""
    from examples.models import tiny_gpt

    model, (ids,) = tiny_gpt()
    gen = torch.Generator().manual_seed(2)
    calib = [(torch.randint(0, 512, ids.shape, generator=gen),) for _ in range(2)]
    graph = gr.capture(model, (ids,))
    res = gr.run_pipeline(graph, "quantize(mode=static,outputs=auto)", verify=False,
                          ctx=PassContext(calibration=calib))
    n_linear = res.records[-1].report["rewrites"]["weight-int8"]
    art = compile_graph(graph, tmp_path / "gpt", CompileOptions(backend="ort", latency_runs=0, rel_tol=0.05))
    ops, _ = _ops_ort_runs(art, tmp_path)
    assert ops["QGemm"] == n_linear and not ops["Gemm"]
    assert art.report["artifact"]["qdq_form"]["integer_biases"] == n_linear
