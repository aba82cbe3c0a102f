"""openvino backend: fp32 example models equal the torch graph, static int8 runs int8 kernels,
bf16 within its tolerance, weight-only and bad options refused before any work."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gradrewrite as gr
from gradrewrite.backends import openvino as ovb
from gradrewrite.backends.base import get_backend
from gradrewrite.backends.options import make_options
from gradrewrite.compiler import CompileOptions, compile_graph
from gradrewrite.errors import BackendError, ConfigError, VerificationError
from gradrewrite.rewrite.registry import PassContext

ov = pytest.importorskip("openvino")  # CI installs the [openvino] extra; elsewhere it is optional


def _compile(graph, out, **backend_options):
    return compile_graph(graph, out, CompileOptions(backend="openvino", latency_runs=0,
                                                    backend_options=backend_options))


def _rel(got, ref):
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _bf16_cpu() -> bool:
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def cnn():
    from examples.models import small_cnn

    model, (x,) = small_cnn()
    return model, x


@pytest.mark.parametrize("name", ["small_cnn", "tiny_gpt"])
def test_fp32_example_models_equal_the_torch_graph(name, tmp_path):
    from examples import models

    model, inputs = getattr(models, name)()
    graph = gr.capture(model, inputs)
    art = _compile(graph.clone(), tmp_path / name)
    rep = art.report
    assert rep["backend"] == "openvino" and rep["target"] == "openvino-cpu-f32"
    assert rep["artifact"]["precision"] == {"requested": "f32", "inference": "f32"}
    assert {p for by_precision in rep["artifact"]["runtime_precisions"].values() for p in by_precision} <= {
        "f32", "i32", "i64"}
    assert rep["verification"]["checked"] and rep["verification"]["relative_error"] <= 1e-4
    assert set(rep["artifact"]["files"]) == {"model.xml", "model.bin", "openvino.json"}
    for seed in (5, 6):
        xs = graph.random_inputs(seed)
        got, = art(*xs)
        ref, = graph(*xs)
        assert _rel(got, ref.detach().numpy()) <= 1e-4


def test_static_int8_small_cnn_runs_int8_kernels(cnn, tmp_path):
    model, x = cnn
    graph = gr.capture(model, (x,))
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randn(x.shape, generator=gen),) for _ in range(4)]
    gr.run_pipeline(graph, "fold-bn,quantize(mode=static)", verify=False, ctx=PassContext(seed=0, calibration=calib))
    art = _compile(graph.clone(), tmp_path / "int8")
    facts = art.report["artifact"]
    # structure: every conv and the linear run int8 (i8/u8) in OpenVINO's compiled runtime model
    layers = facts["runtime_precisions"]
    assert set(layers["Convolution"]) <= {"i8", "u8"} and sum(layers["Convolution"].values()) == 5
    assert set(layers["FullyConnected"]) <= {"i8", "u8"}
    assert facts["int8_layers"] == 6 and facts["quantized_input"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(facts["onnx_ops"])
    # numerics: against the graph's fake quantization within the int8 tolerance
    check = facts["lowering_check"]
    assert check["relative_error"] <= check["tolerance"] == pytest.approx(ovb.FP32_REL_TOL + ovb.INT8_REL_TOL)
    for seed in (7, 8):
        xs = graph.random_inputs(seed)
        got, = art(*xs)
        ref, = graph(*xs)
        assert _rel(got, ref.detach().numpy()) <= ovb.INT8_REL_TOL


def test_bf16_precision_verified_within_its_tolerance(cnn, tmp_path):
    model, x = cnn
    graph = gr.capture(model, (x,))
    art = _compile(graph.clone(), tmp_path / "bf16", precision="bf16")
    rep = art.report
    if not _bf16_cpu():  # OpenVINO runs f32 where the CPU has no bf16
        assert rep["artifact"]["precision"]["inference"] == "f32"
        return
    assert rep["target"] == "openvino-cpu-bf16"
    assert rep["artifact"]["precision"] == {"requested": "bf16", "inference": "bf16"}
    assert rep["artifact"]["runtime_precisions"]["Convolution"] == {"bf16": 5}
    v = rep["verification"]
    assert v["checked"] and v["tolerance"] == ovb.BF16_REL_TOL
    assert 1e-4 < v["relative_error"] <= ovb.BF16_REL_TOL   # really bf16, and within its tolerance
    xs = graph.random_inputs(9)
    got, = art(*xs)
    assert _rel(got, graph(*xs)[0].detach().numpy()) <= ovb.BF16_REL_TOL


def test_bf16_beyond_its_tolerance_fails_verification(cnn, tmp_path, monkeypatch):
    if not _bf16_cpu():
        pytest.skip("no bf16 on this CPU")
    model, x = cnn
    monkeypatch.setattr(ovb, "BF16_REL_TOL", 1e-6)
    with pytest.raises(VerificationError, match="rewritten graph"):
        _compile(gr.capture(model, (x,)), tmp_path / "tight", precision="bf16")
    assert not (tmp_path / "tight").exists()


def test_weight_only_graph_refused_before_the_export(tmp_path, monkeypatch):
    torch.manual_seed(0)
    graph = gr.capture(torch.nn.Sequential(torch.nn.Linear(64, 32)).eval(), (torch.randn(2, 64),))
    gr.run_pipeline(graph, "quantize(mode=weight-only,bits=4,group=32)", verify=False)
    monkeypatch.setattr("gradrewrite.backends.ort.export_onnx", lambda *a, **k: pytest.fail("exported"))
    with pytest.raises(ConfigError, match="weight-only .* --backend ort or tvm") as err:
        _compile(graph, tmp_path / "wo")
    assert "\n" not in str(err.value)


def test_weight_only_pipeline_refused_before_the_passes_run(tmp_path):
    torch.manual_seed(0)
    graph = gr.capture(torch.nn.Sequential(torch.nn.Linear(64, 32)).eval(), (torch.randn(2, 64),))
    before = graph.text()
    with pytest.raises(ConfigError, match=r"quantize\(mode=weight-only, bits=4\)"):
        compile_graph(graph, tmp_path / "wo", CompileOptions(backend="openvino", passes="quantize(bits=4,group=32)"))
    assert graph.text() == before and not (tmp_path / "wo").exists()


def test_bad_options_fail_naming_the_valid_ones():
    with pytest.raises(ConfigError, match="valid precisions: f32, bf16, auto"):
        make_options("openvino", {"precision": "fp8"})
    with pytest.raises(ConfigError, match="valid targets: auto, cpu, gpu"):
        make_options("openvino", {"target": "cuda"})
    backend = get_backend("openvino")
    if not any(d.startswith("GPU") for d in ov.Core().available_devices):
        with pytest.raises(BackendError, match="OpenVINO sees no GPU"):
            backend.check_request(make_options("openvino", {"target": "gpu"}))
    backend.check_request(make_options("openvino", {"target": "cpu", "precision": "bf16"}))
