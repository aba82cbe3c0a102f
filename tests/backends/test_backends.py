"""torch and ort backends: real exports, real onnxruntime sessions, numerics vs eager."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import gradrewrite as gr
from gradrewrite.backends.base import backend_names, get_backend
from gradrewrite.errors import ConfigError, GradrewriteError


def test_backend_registry():
    assert {"torch", "ort"} <= set(backend_names())
    with pytest.raises(ConfigError, match="valid backends: .*ort.*torch"):
        get_backend("tensorrt")


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_compile_and_call(tmp_path, convbn_model, convbn_graph, backend):
    art = gr.compile(convbn_graph, tmp_path / "out", passes="fold-bn,dce", backend=backend)
    rep = art.report
    assert rep["backend"] == backend and rep["nodes"]["before"] - rep["nodes"]["after"] == 3
    v = rep["verification"]
    assert v["inputs_compared"] == 3 and v["relative_error"] < 1e-5
    x = torch.randn(2, 3, 12, 12)
    got, = art(x)
    ref = convbn_model(x).detach().numpy()
    assert np.abs(got - ref).max() <= 1e-5 * (1 + np.abs(ref).max())
    # the artifact reloads from disk alone
    again, = gr.Artifact(tmp_path / "out")(x)
    np.testing.assert_array_equal(again, got)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"report.json", "manifest.json", "graph_before.txt", "graph_after.txt"} <= files
    assert ("model.onnx" if backend == "ort" else "model.pt2") in files


def test_ort_model_is_plain_onnx_with_folded_bn(tmp_path, convbn_graph):
    art = gr.compile(convbn_graph, tmp_path / "o", passes="fold-bn", backend="ort")
    model = onnx.load(str(tmp_path / "o" / "model.onnx"))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") <= 1 and ops.count("Conv") == 3
    assert art.report["artifact"]["providers"][-1] == "CPUExecutionProvider"
    assert art.report["artifact"]["opset"] >= 17


def test_ort_external_data(tmp_path, convbn_graph):
    gr.compile(convbn_graph, tmp_path / "o", backend="ort", backend_options={"external_data": True})
    assert (tmp_path / "o" / "model.onnx.data").stat().st_size > 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert "model.onnx.data" in rep["artifact"]["files"]
    out, = gr.Artifact(tmp_path / "o")(convbn_graph.example_inputs[0])
    assert out.shape == (2, 5)


def test_int_inputs_through_ort(tmp_path):
    class Tok(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50)

        def forward(self, ids):
            return self.out(torch.nn.functional.gelu(self.emb(ids)))

    g = gr.capture(Tok().eval(), (torch.randint(0, 50, (1, 7)),))
    art = gr.compile(g, tmp_path / "o", backend="ort")
    assert art.report["inputs"][0]["high"] == 50
    assert art.report["verification"]["relative_error"] < 1e-5


def test_artifact_checks_inputs(tmp_path, convbn_graph):
    art = gr.compile(convbn_graph, tmp_path / "o", backend="ort")
    with pytest.raises(GradrewriteError, match="compiled for 2x3x12x12:float32"):
        art(np.zeros((1, 3, 12, 12), np.float32))
    with pytest.raises(GradrewriteError, match="takes 1 input"):
        art(np.zeros((2, 3, 12, 12), np.float32), np.zeros(1))


def test_tampered_artifact_is_refused(tmp_path, convbn_graph):
    gr.compile(convbn_graph, tmp_path / "o", backend="ort")
    with open(tmp_path / "o" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(GradrewriteError, match="changed since it was compiled"):
        gr.Artifact(tmp_path / "o")(convbn_graph.example_inputs[0])


def test_manifest(tmp_path, convbn_graph):
    gr.compile(convbn_graph, tmp_path / "a", passes="fold-bn", backend="torch")
    gr.compile(convbn_graph, tmp_path / "b", passes="fold-bn", backend="torch")
    gr.compile(convbn_graph, tmp_path / "c", passes="fold-bn,dce", backend="torch")
    ma, mb, mc = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "abc")
    assert ma["config_hash"] == mb["config_hash"] != mc["config_hash"]
    assert {"torch", "onnx", "python", "gradrewrite"} <= set(ma["versions"])
    assert set(ma["outputs"]) >= {"model.pt2", "report.json", "graph_after.txt"}
    assert all(len(h) == 64 for h in ma["outputs"].values())


def test_existing_out_needs_force(tmp_path, convbn_graph):
    out = tmp_path / "o"
    gr.compile(convbn_graph, out)
    with pytest.raises(ConfigError, match="--force"):
        gr.compile(convbn_graph, out)
    gr.compile(convbn_graph, out, passes="fold-bn", force=True)
    assert gr.Artifact(out).report["nodes"]["after"] < gr.Artifact(out).report["nodes"]["before"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]   # no temp or old dirs left


def test_failed_compile_leaves_nothing(tmp_path, convbn_graph):
    with pytest.raises(GradrewriteError):
        gr.compile(convbn_graph, tmp_path / "o", passes="fold-bn(select='path:zzz')")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_op_in_ort_is_one_error(tmp_path):
    class Weird(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x).real      # no ONNX lowering

    g = gr.capture(Weird(), (torch.randn(3, 3),))
    with pytest.raises(GradrewriteError) as e:
        gr.compile(g, tmp_path / "o", backend="ort")
    assert "ONNX export failed" in str(e.value) and "--backend torch" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_export_metadata_reaches_onnx_and_report(tmp_path, convbn_graph):
    convbn_graph.meta["export_metadata"] = {"example": {"layers": ["features.0"], "density": 0.5}}
    for external in (False, True):
        out = tmp_path / f"o{external}"
        art = gr.compile(convbn_graph, out, backend="ort", backend_options={"external_data": external})
        model = onnx.load(str(out / "model.onnx"))
        props = {p.key: json.loads(p.value) for p in model.metadata_props}
        assert props["gradrewrite.example"] == {"density": 0.5, "layers": ["features.0"]}
        assert art.report["export_metadata"]["example"]["density"] == 0.5
        assert art(convbn_graph.example_inputs[0])[0].shape == (2, 5)   # still loads (external data intact)


def test_pending_training_rewrites_refused(tmp_path, convbn_graph):
    convbn_graph.meta["pending_training"] = "nm-sparsity"
    with pytest.raises(ConfigError, match="nm-finalize"):
        gr.compile(convbn_graph, tmp_path / "o")
    assert list(tmp_path.iterdir()) == []
