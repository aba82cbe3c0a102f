"""tvm backend on quantized graphs: static int8 chains lowered to integer ops and to int8 x
int8 -> int32 Relax compute (bit-exact against the integer reference, within int8
tolerance of the torch backend's fake-quant), and weight-only graphs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import gradrewrite as gr
from gradrewrite.rewrite import int8_layers as int8
from gradrewrite.backends.mcu.inference.reference import INT8_REL_TOL
from gradrewrite.backends.tvm.int8_ops import INT8_OPS, lower_int8
from gradrewrite.compiler import CompileOptions, compile_graph
from gradrewrite.rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL
from gradrewrite.rewrite.registry import PassContext
from tests.cli.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
SMALL_CNN_LAYERS = {"int8-add": 1, "int8-conv": 5, "int8-linear": 1}


def _inputs(shape, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


@pytest.fixture(scope="module")
def qcnn():
    """small_cnn after fold-bn + static int8 quantize (the graph the backend receives)."""
    from examples.models import small_cnn

    model, (x,) = small_cnn()
    graph = gr.capture(model, (x,))
    calib = [(t,) for t in _inputs(x.shape, 4, 0)]
    gr.run_pipeline(graph, "fold-bn,quantize(mode=static)", verify=False,
                    ctx=PassContext(seed=0, calibration=calib))
    return graph


@pytest.fixture(scope="module")
def qcnn_artifact(qcnn, tmp_path_factory):
    opts = CompileOptions(backend="tvm", latency_runs=0, verify_inputs=1, rel_tol=INT8_REL_TOL,
                          backend_options={"target": "llvm"})
    return compile_graph(qcnn.clone(), tmp_path_factory.mktemp("tvm_int8") / "cnn", opts)


def _relax_calls(mod, names):
    """(op name, argument dtypes, result dtype) of every call to ``names`` in ``main``."""
    from tvm import relax

    found = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and getattr(value.op, "name", None) in names:
                found.append((value.op.name, tuple(str(a.ty.dtype) for a in value.args[:2]),
                              str(binding.var.ty.dtype)))
    return found


# --------------------------------------------------------------------------- structure
def test_lower_int8_replaces_every_chain_and_keeps_the_input_graph(qcnn):
    before = qcnn.text()
    lowered, fired = lower_int8(qcnn)
    assert fired == SMALL_CNN_LAYERS
    assert qcnn.text() == before                      # the backend works on a copy
    hist = lowered.op_histogram()
    assert hist["gradrewrite.tvm_int8_conv2d"] == 5 and hist["gradrewrite.tvm_int8_linear"] == 1
    assert hist["gradrewrite.tvm_int8_add"] == 1
    # the float chains are gone: no float conv/linear, no fused ReLU, no weight dequantize
    assert not {"aten.conv2d", "aten.linear", "aten.relu_", "quantized_decomposed.dequantize_per_channel"} & set(hist)
    # after re-export no float conv/linear and no weight dequantize is left
    ep = lowered.to_exported_program().run_decompositions()
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert DEQUANTIZE_PER_CHANNEL not in targets and {INT8_OPS[k] for k in ('conv', 'linear', 'add')} <= targets
    aten = torch.ops.aten
    assert not targets & {aten.convolution.default, aten.linear.default, aten.addmm.default, aten.mm.default}


def test_lowered_graph_runs_the_integer_reference_in_torch(qcnn):
    lowered, _ = lower_int8(qcnn)
    for x in _inputs((1, 3, 32, 32), 3, 7):
        got, = lowered(x)
        ref, = int8.integer_reference(qcnn, x)
        assert torch.equal(got, ref)


def test_float_graph_is_not_touched():
    g = gr.capture(torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),))
    assert lower_int8(g) == (g, {})


def test_relax_module_computes_int8_with_int32_accumulation(qcnn):
    from gradrewrite.backends.tvm.importer import import_graph
    from gradrewrite.backends.tvm.relax_passes import preprocess

    imported = import_graph(qcnn)
    assert imported.quantized == {"int8_layers": SMALL_CNN_LAYERS, "fp32_weights": {}}
    mod = preprocess(imported.mod)
    calls = _relax_calls(mod, ("relax.nn.conv2d", "relax.matmul"))
    assert sorted(calls) == ([("relax.matmul", ("int8", "int8"), "int32")]
                             + [("relax.nn.conv2d", ("int8", "int8"), "int32")] * 5)


# --------------------------------------------------------------------------- numerics
@pytest.mark.slow
def test_small_cnn_bit_exact_against_the_integer_reference(qcnn, qcnn_artifact):
    rep = qcnn_artifact.report
    assert rep["artifact"]["quantized"]["int8_layers"] == SMALL_CNN_LAYERS
    for x in _inputs((1, 3, 32, 32), 3, 11):
        got, = qcnn_artifact(x)
        ref, = int8.integer_reference(qcnn, x)
        np.testing.assert_array_equal(got, ref.numpy())


class _DepthwiseNet(torch.nn.Module):
    """MobileNet-style layers: strided conv + ReLU6, depthwise conv + ReLU6, pointwise conv,
    flatten + linear (the int8 patterns small_cnn lacks)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU6())
        self.dw = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, 1, 1, groups=8), torch.nn.ReLU6())
        self.pw = torch.nn.Conv2d(8, 4, 1)
        self.fc = torch.nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pw(self.dw(self.stem(x))), 1))


def test_depthwise_relu6_and_flatten_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = _DepthwiseNet().eval()
    graph = gr.capture(model, (torch.randn(1, 3, 16, 16),))
    calib = [(t,) for t in _inputs((1, 3, 16, 16), 4, 21)]
    gr.run_pipeline(graph, "quantize(mode=static)", verify=False, ctx=PassContext(seed=0, calibration=calib))
    art = compile_graph(graph.clone(), tmp_path / "dw", CompileOptions(
        backend="tvm", latency_runs=0, verify_inputs=1, rel_tol=INT8_REL_TOL, backend_options={"target": "llvm"}))
    assert art.report["artifact"]["quantized"]["int8_layers"] == {"int8-conv": 3, "int8-linear": 1}
    for x in _inputs((1, 3, 16, 16), 3, 22):
        got, = art(x)
        ref, = int8.integer_reference(graph, x)
        np.testing.assert_array_equal(got, ref.numpy())


def test_float_output_layers_bit_exact(tmp_path):
    """int8 conv / linear whose outputs stay float (quantize's outputs=auto): int8 x int8 ->
    int32 compute, then float32(acc) * s_x * s_w[c]; bit-exact against the integer reference."""
    from tests.backends.test_mcu_codegen_int8 import QFloatOutNet

    x = torch.randn(2, 3, 12, 12)
    graph = gr.capture(QFloatOutNet().eval(), (x,))
    assert lower_int8(graph)[1] == {"int8-conv-float": 1, "int8-linear-float": 1}
    art = compile_graph(graph.clone(), tmp_path / "f", CompileOptions(
        backend="tvm", latency_runs=0, verify_inputs=1, rel_tol=INT8_REL_TOL, backend_options={"target": "llvm"}))
    assert art.report["artifact"]["quantized"] == {
        "int8_layers": {"int8-conv-float": 1, "int8-linear-float": 1}, "fp32_weights": {}}
    for x in _inputs((2, 3, 12, 12), 3, 23):
        got, = art(x)
        ref, = int8.integer_reference(graph, x)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, ref.numpy())


def test_small_cnn_within_int8_tolerance_of_the_torch_backend(qcnn, qcnn_artifact, tmp_path):
    torch_art = gr.compile(qcnn, tmp_path / "torch", backend="torch")
    for x in _inputs((1, 3, 32, 32), 3, 13):
        got, = qcnn_artifact(x)
        ref, = torch_art(x)     # fake-quant: float conv on dequantized values
        assert np.linalg.norm(got - ref) <= INT8_REL_TOL * np.linalg.norm(ref)


@pytest.mark.slow
def test_transformer_static_int8_linear_layers(tmp_path):
    """tiny GPT, static int8: 3-D int8 matmuls whose outputs stay float (outputs=auto: every
    reader is layer norm, attention, GELU or a float residual); those stay fp32 between them,
    so it matches the integer reference to fp32 rounding, not bit for bit."""
    from examples.models import tiny_gpt

    model, (ids,) = tiny_gpt()
    graph = gr.capture(model, (ids,))
    gen = torch.Generator().manual_seed(2)
    calib = [(torch.randint(0, 512, ids.shape, generator=gen),) for _ in range(2)]
    gr.run_pipeline(graph, "quantize(mode=static)", verify=False, ctx=PassContext(seed=0, calibration=calib))
    art = compile_graph(graph.clone(), tmp_path / "gpt", CompileOptions(
        backend="tvm", latency_runs=0, verify_inputs=1, rel_tol=INT8_REL_TOL, backend_options={"target": "llvm"}))
    assert art.report["artifact"]["quantized"]["int8_layers"] == {"int8-linear-float": 8}
    x = torch.randint(0, 512, ids.shape, generator=gen)
    got, = art(x)
    ref, = int8.integer_reference(graph, x)
    assert np.abs(got - ref.numpy()).max() <= 1e-4 * (1 + ref.abs().max().item())


# --------------------------------------------------------------------------- weight-only
@pytest.mark.slow
def test_weight_only_compiles_with_fp32_weights(tmp_path):
    """groupwise_linear (4-bit codes + fp16 outliers): dequantized at import into an fp32
    weight, so TVM matches the torch backend to fp32 rounding."""
    from examples.models import tiny_gpt

    model, (ids,) = tiny_gpt()
    graph = gr.capture(model, (ids,))
    gr.run_pipeline(graph, "quantize(mode=weight-only,bits=4,group=32,outliers=0.01,criterion=magnitude)",
                    verify=False)
    art = compile_graph(graph.clone(), tmp_path / "wo", CompileOptions(
        backend="tvm", latency_runs=0, verify_inputs=1, backend_options={"target": "llvm"}))
    assert art.report["artifact"]["quantized"] == {"int8_layers": {}, "fp32_weights": {"groupwise_linear": 8}}
    assert art.report["verification"]["relative_error"] < 1e-5
    x = torch.randint(0, 512, ids.shape, generator=torch.Generator().manual_seed(4))
    got, = art(x)
    ref, = graph(x)
    assert np.abs(got - ref.numpy()).max() <= 1e-5 * (1 + ref.abs().max().item())


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cli_static_int8_small_cnn(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((4, 1, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "out"
    # --module: examples/models/*.pt2 are build outputs, not in git
    run_cli("compile", "--module", "examples.models:small_cnn", "-p", "fold-bn,quantize(mode=static)", "--calib",
            calib, "--backend", "tvm", "--tune-trials", "0", "-o", out, "-q", cwd=ROOT, check=True)
    meta = json.loads((out / "tvm_meta.json").read_text())
    assert meta["quantized"]["int8_layers"] == SMALL_CNN_LAYERS
    run_cli("run", out, "--random", "-o", tmp_path / "y.npz", check=True)
    y = np.load(tmp_path / "y.npz")["output_0"]
    assert y.shape == (1, 10) and np.isfinite(y).all()
