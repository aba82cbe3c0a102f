"""Static int8 through the openvino backend: the kernels OpenVINO's compiled model runs
(``primitiveType``, not the input precision ``runtimePrecision`` reports) are int8 for every
conv (depthwise included) with the residual adds fused or int8, the outputs stay within a
quantization step of the torch fake-quant graph, and a small BERT's int8 check passes at
batch 8."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch import nn

import gradrewrite as gr
from gradrewrite.backends import openvino as ovb
from gradrewrite.compiler import CompileOptions, compile_graph
from gradrewrite.errors import VerificationError
from gradrewrite.rewrite.registry import PassContext

ov = pytest.importorskip("openvino")


class InvertedResidual(nn.Module):
    """x + (1x1 expand, ReLU6, 3x3 depthwise, ReLU6, 1x1 project)(x)."""

    def __init__(self, ch: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, hidden, 1), nn.ReLU6(),
                                  nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.ReLU6(),
                                  nn.Conv2d(hidden, ch, 1))

    def forward(self, x):
        return x + self.body(x)


class TinyResNet(nn.Module):
    """stem conv + ReLU6, a residual block with a depthwise conv, average pooling, a
    strided conv, a second residual block: 8 convs, 2 adds, output a quantized conv map."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1, self.b2 = InvertedResidual(16, 32), InvertedResidual(24, 48)
        self.down = nn.Conv2d(16, 24, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.b1(nn.functional.relu6(self.stem(x)))
        return self.b2(self.down(nn.functional.avg_pool2d(y, 2)))


CONVS = 8


def _kernels(compiled) -> collections.Counter:
    """(layerType, primitiveType) of every compute layer of OpenVINO's runtime model."""
    out = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind not in ("Const", "Input", "Output", "Reorder", "Reshape"):
            out[(kind, info["primitiveType"].astype(str))] += 1
    return out


def _calib(shape, n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g),) for _ in range(n)]


def _compile(graph, out):
    return compile_graph(graph, out, CompileOptions(backend="openvino", latency_runs=0,
                                                    backend_options={"precision": "f32", "target": "cpu"}))


def _output_step(graph) -> float:
    """One quantization step of the output: the scale of the dequantize producing it, or
    the sum of the scales of the two dequantized values a final residual add sums."""
    dq = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    node = graph.gm.graph.output_node().args[0][0]
    feeds = [node] if node.target == dq else [a for a in node.args if getattr(a, "target", None) == dq]
    assert feeds and (node.target == dq or node.target == torch.ops.aten.add.Tensor), node.target
    return sum(float(f.args[1]) for f in feeds)


def _quantized(model, calib, seed=0):
    graph = gr.capture(model, calib[0])
    gr.run_pipeline(graph, "fold-bn,quantize(mode=static)", verify=False,
                    ctx=PassContext(seed=seed, calibration=calib))
    return graph


@pytest.fixture(scope="module")
def cnn_int8(tmp_path_factory):
    model = TinyResNet().eval()
    graph = _quantized(model, _calib((2, 3, 32, 32)))
    return model, graph, _compile(graph.clone(), tmp_path_factory.mktemp("ov") / "int8")


def test_cnn_convs_depthwise_and_adds_run_int8_kernels(cnn_int8):
    model, graph, art = cnn_int8
    facts = art.report["artifact"]
    assert facts["qdq_form"]["quantize"] > 0 and facts["qdq_form"]["kept_int8"] == 0
    # structure: OpenVINO's own runtime model, read back from the saved IR
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(art.path / "model.xml")), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    kernels = _kernels(compiled)
    convs = {k: n for k, n in kernels.items() if k[0] in ("Convolution", "GroupConvolution")}
    assert sum(convs.values()) == CONVS, kernels
    assert all(p.lower().endswith(("_i8", "_u8")) for _, p in convs), convs   # depthwise included
    assert any("_dw_" in p for _, p in convs)
    # the residual adds are fused into the int8 convs or run int8 themselves: no float add
    float_adds = [k for k in kernels if k[0] == "Eltwise" and not k[1].lower().endswith(("_i8", "_u8"))]
    assert not float_adds, kernels
    assert {"f32"} != set(facts["runtime_precisions"]["Convolution"])    # the report reads kernels too
    assert facts["int8_layers"] == CONVS
    # numerics: within one output quantization step of the torch fake-quant graph
    step = _output_step(graph)
    for seed in (11, 12):
        x = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(seed))
        got, = art(x.numpy())
        ref = graph(x)[0].detach().numpy()
        diff = np.abs(got - ref)
        assert float(diff.max()) <= 1.0001 * step, (float(diff.max()) / step)
        assert float(np.mean(diff > step / 2)) < 0.01   # almost every value identical


def test_int8_check_fails_a_wrong_lowering(cnn_int8):
    """The int8 check, widened to the graph's own rounding sensitivity, still rejects an
    artifact that computes another quantization: the same model calibrated on inputs 10x
    smaller (clipping what it meets) checked against the graph it did not lower."""
    model, graph, art = cnn_int8
    other = _quantized(model, [(x * 0.1,) for (x,) in _calib((2, 3, 32, 32))])
    backend = ovb.OpenvinoBackend()
    info = {**art.report["artifact"]}
    with pytest.raises(VerificationError, match="disagrees with the rewritten graph"):
        backend.check_artifact(art._run(), other, info, n_inputs=2, seed=5)
    check = info["lowering_check"]
    assert check["rounding_sensitivity"] < ovb.INT8_REL_TOL < check["relative_error"]
    # and passes the graph it lowered, without needing the widening
    info = {**art.report["artifact"]}
    assert backend.check_artifact(art._run(), graph, info, n_inputs=2, seed=5) is None
    assert info["lowering_check"]["relative_error"] <= ovb.INT8_REL_TOL


def test_uint8_form_is_exact_on_the_dequantized_values(tmp_path):
    """The rewrite only shifts integers: OpenVINO in f32 without its low-precision
    transformations cannot tell the two files apart (same outputs up to fp32 rounding)."""
    from gradrewrite.backends.openvino_qdq import openvino_form
    from gradrewrite.backends.ort import export_onnx

    model = TinyResNet().eval()
    calib = _calib((1, 3, 32, 32))
    graph = gr.capture(model, calib[0])
    gr.run_pipeline(graph, "quantize(mode=static)", verify=False, ctx=PassContext(seed=0, calibration=calib))
    export_onnx(graph, tmp_path / "model.onnx", qdq_form="as-is")
    path, done = openvino_form(tmp_path / "model.onnx")
    assert path != tmp_path / "model.onnx" and done["quantize"] == done["dequantize"] > 0
    import onnx

    kinds = collections.Counter((n.op_type, onnx.numpy_helper.to_array(i).dtype.name)
                                for m in (onnx.load(str(path)),) for n in m.graph.node
                                for i in m.graph.initializer if n.op_type == "QuantizeLinear" and i.name == n.input[2])
    assert set(kinds) == {("QuantizeLinear", "uint8")}
    import onnxruntime as ort

    x = calib[0][0].numpy()
    outs = []
    for p in (tmp_path / "model.onnx", path):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the float reference ops
        sess = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x})[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-6)


def test_small_bert_int8_check_passes_at_batch_8(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    bert = transformers.BertModel(cfg, add_pooling_layer=False).eval()

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask):
            h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    g = torch.Generator().manual_seed(0)

    def batch():
        mask = torch.ones(8, 32, dtype=torch.long)
        for i in range(8):
            mask[i, int(torch.randint(8, 33, (1,), generator=g)):] = 0
        return torch.randint(0, 256, (8, 32), generator=g), mask
    calib = [batch() for _ in range(4)]
    model = Pooled().eval()
    graph = gr.capture(model, calib[0])
    gr.run_pipeline(graph, "quantize(mode=static,outputs=auto)", verify=False,
                    ctx=PassContext(seed=0, calibration=calib))
    art = _compile(graph.clone(), tmp_path / "bert")
    facts = art.report["artifact"]
    check = facts["lowering_check"]
    assert check["relative_error"] <= check["tolerance"]
    assert facts["precision"]["inference"] == "f32"
    assert sum(n for p, n in facts["runtime_precisions"].get("FullyConnected", {}).items() if p in ("i8", "u8")) >= 12
    for _ in range(2):
        ids, mask = batch()
        got, = art(ids.numpy(), mask.numpy())
        ref = graph(ids, mask)[0].detach().numpy()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= ovb.INT8_REL_TOL
