"""The ort backend's int8 form picks ONNX Runtime's fast integer kernels: a conv with 3 input
channels (an image model's stem) gets zero channels up to 4, so ORT's symmetric indirect conv
kernel takes it; deep 1x1 convs (on AMX CPUs) get weight zero point -1, so ORT's GEMM path
takes them. Neither changes an output."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch import nn

import gradrewrite as gr
from gradrewrite.backends import ort_int8
from gradrewrite.compiler import CompileOptions, compile_graph
from gradrewrite.rewrite.registry import PassContext

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
ir = pytest.importorskip("onnx_ir")


class Stem(nn.Module):
    """Conv(3 -> 16, 3x3 / 2) + ReLU, a 1x1 conv to 8 channels (too few outputs for the
    symmetric kernel), a conv with 8 input channels (already aligned), global pool."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.narrow = nn.Conv2d(16, 8, 1)
        self.aligned = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.narrow(torch.relu(self.stem(x))))
        return torch.relu(self.aligned(y)).mean((2, 3))


@pytest.fixture(scope="module")
def stem_graph():
    g = torch.Generator().manual_seed(5)
    calib = [(torch.randn(1, 3, 24, 24, generator=g),) for _ in range(4)]
    graph = gr.capture(Stem().eval(), calib[0])
    gr.run_pipeline(graph, "quantize(mode=static)", verify=False, ctx=PassContext(calibration=calib))
    return graph


def _session(path, level=None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    if level is not None:
        opts.graph_optimization_level = level
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _run(session, x):
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _conv_weights(model) -> list[tuple[int, ...]]:
    """The weight shapes of the model's convs, in graph order."""
    init = {t.name: tuple(t.dims) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    shapes = []
    for n in model.graph.node:
        if n.op_type == "Conv":
            dq = producer[n.input[1]]
            shapes.append(init[dq.input[0]])
    return shapes


@pytest.fixture(scope="module")
def exported(stem_graph, tmp_path_factory):
    """The exporter's model with the uint8 rewrite only, and with the channel padding too."""
    from gradrewrite.backends.ort import export_onnx

    path = tmp_path_factory.mktemp("stem") / "as_is.onnx"
    export_onnx(stem_graph, path, qdq_form="as-is")
    out = {}
    rewrites = {"uint8": (), "padded": (ort_int8.padded_conv_channels,),
                # the 1x1 conv has 16 input channels: a threshold of 16 takes it
                "gemm": (lambda m: ort_int8.gemm_path_pointwise(m, min_channels=16),)}
    for name, fns in rewrites.items():
        model = ir.load(str(path))
        ort_int8.activations_to_uint8(model)
        out[f"{name}_counts"] = [fn(model) for fn in fns]
        dest = path.parent / f"{name}.onnx"
        ir.save(model, str(dest))
        out[name] = dest
    return out


def test_only_the_unaligned_stem_is_padded(exported):
    assert exported["padded_counts"] == [1]
    before = _conv_weights(onnx.load(str(exported["uint8"])))
    after = _conv_weights(onnx.load(str(exported["padded"])))
    assert before == [(16, 3, 3, 3), (8, 16, 1, 1), (16, 8, 3, 3)]
    assert after == [(16, 4, 3, 3), (8, 16, 1, 1), (16, 8, 3, 3)]
    model = onnx.load(str(exported["padded"]))
    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    assert len(pads) == 1
    # pads the quantized (uint8) input with its own zero point, channel axis only
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert list(init[pads[0].input[1]]) == [0, 0, 0, 0, 0, 1, 0, 0]
    q = next(n for n in model.graph.node if pads[0].input[0] in n.output)
    assert q.op_type == "QuantizeLinear" and pads[0].input[2] == q.input[2]
    assert init[q.input[2]].dtype == np.uint8
    # the padded weight replaces the stored one under its name: no stale copy in the file
    int8 = lambda m: sorted(t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    assert int8(model) == int8(onnx.load(str(exported["uint8"])))
    # the unpadded input's DequantizeLinear had no other reader: gone
    assert sum(n.op_type == "DequantizeLinear" and n.input[0] == q.output[0] for n in model.graph.node) == 0


@pytest.mark.parametrize("rewrite", ["padded", "gemm"])
@pytest.mark.parametrize("level", ["none", "all"])
def test_rewrites_change_no_output(exported, rewrite, level):
    """Float graph (no fusions): padding adds products 0.0 * 0.0, the shifted weights with
    zero point -1 dequantize to the same floats. ORT's integer kernels: the symmetric kernel
    and the GEMM + requantize path give the same integers here."""
    lvl = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if level == "none" else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    a, b = _session(exported["uint8"], lvl), _session(exported[rewrite], lvl)
    for seed in (1, 2, 3):
        x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(seed)).numpy()
        np.testing.assert_array_equal(_run(a, x), _run(b, x))


def test_ort_fuses_the_padded_stem(stem_graph, tmp_path):
    """Through the backend: ORT's optimized model runs the padded stem as a channels-last
    QLinearConv over 4 channels, reading the uint8 Pad; no conv stays float."""
    art = compile_graph(stem_graph.clone(), tmp_path / "art",
                        CompileOptions(backend="ort", latency_runs=0, rel_tol=0.05))
    assert art.report["artifact"]["qdq_form"]["conv_channels_padded"] == 1
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(art.path / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp_path / "optimized.onnx"))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["QLinearConv"] == 3 and not ops["Conv"] and ops["Pad"] == 1
    init = {t.name: tuple(t.dims) for t in model.graph.initializer}
    first = next(n for n in model.graph.node if n.op_type == "QLinearConv")
    assert init[first.input[3]] == (16, 4, 3, 3)


def _weight_dq(model, conv):
    producer = {o: n for n in model.graph.node for o in n.output}
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = producer[conv.input[1]]
    return init[dq.input[0]], init[dq.input[2]]


def test_gemm_path_shifts_only_deep_pointwise_weights(exported):
    """Only the 1x1 conv with >= 16 input channels changes: codes - 1, zero point -1."""
    assert exported["gemm_counts"] == [1]
    before, after = (onnx.load(str(exported[k])) for k in ("uint8", "gemm"))
    convs = [(b, a) for b, a in zip(before.graph.node, after.graph.node) if b.op_type == "Conv"]
    assert len(convs) == 3
    names = lambda m: sorted(t.name for t in m.graph.initializer)
    assert names(after) == names(before)          # shifted codes and zero points under the old names
    for i, (b, a) in enumerate(convs):
        (wb, zb), (wa, za) = _weight_dq(before, b), _weight_dq(after, a)
        assert not zb.any()
        if i == 1:                                    # the 16 -> 8 1x1 conv
            assert za.dtype == np.int8 and (za == -1).all()
            np.testing.assert_array_equal(wa.astype(np.int16), wb.astype(np.int16) - 1)
        else:                                         # 3x3 convs, or too few input channels
            np.testing.assert_array_equal(wa, wb)
            assert not za.any()


def test_ort_form_asks_for_amx(stem_graph, tmp_path):
    """``amx=False`` leaves the weights symmetric; the default threshold (320 input
    channels) takes none of this model's convs either way."""
    from gradrewrite.backends.ort import export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(stem_graph, path, qdq_form="as-is")
    for amx in (False, True):
        model = ir.load(str(path))
        assert ort_int8.ort_form(model, amx=amx)["pointwise_gemm_path"] == 0
    model = ir.load(str(path))
    ort_int8.activations_to_uint8(model)
    assert ort_int8.gemm_path_pointwise(model, min_channels=17) == 0


def test_ort_fuses_the_shifted_weights(exported, tmp_path):
    """Zero point -1 (all channels equal) still fuses: every conv a QLinearConv."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(exported["gemm"]), sess_options=opts, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["QLinearConv"] == 3 and not ops["Conv"]


class Strided(nn.Module):
    """1x1 convs over 16 channels: stride 2 (ORT would need im2col: left alone), stride 1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.down = nn.Conv2d(16, 16, 1, stride=2)
        self.point = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        return self.point(torch.relu(self.down(x)))


def test_gemm_path_only_for_unit_strides(tmp_path):
    from gradrewrite.backends.ort import export_onnx

    g = torch.Generator().manual_seed(6)
    calib = [(torch.randn(1, 16, 8, 8, generator=g),) for _ in range(2)]
    graph = gr.capture(Strided().eval(), calib[0])
    gr.run_pipeline(graph, "quantize(mode=static)", verify=False, ctx=PassContext(calibration=calib))
    export_onnx(graph, tmp_path / "m.onnx", qdq_form="as-is")
    model = ir.load(str(tmp_path / "m.onnx"))
    ort_int8.activations_to_uint8(model)
    assert ort_int8.gemm_path_pointwise(model, min_channels=16) == 1
    ir.save(model, str(tmp_path / "g.onnx"))
    saved = onnx.load(str(tmp_path / "g.onnx"))
    zps = [_weight_dq(saved, n)[1] for n in saved.graph.node if n.op_type == "Conv"]
    assert [int(z.min()) for z in zps] == [0, -1]
