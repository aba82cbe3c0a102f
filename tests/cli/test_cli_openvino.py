"""`gradrewrite compile -b openvino` and `gradrewrite run` on the example models, end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import assert_user_error, run_cli

pytest.importorskip("openvino")  # CI installs the [openvino] extra

@pytest.fixture(scope="module")
def small_cnn_pt2(tmp_path_factory) -> Path:
    """The example small CNN as a .pt2 (a clean checkout has no examples/models/*.pt2)."""
    from examples.models import small_cnn

    model, example = small_cnn()
    path = tmp_path_factory.mktemp("openvino_cli") / "small_cnn.pt2"
    torch.export.save(torch.export.export(model, example), str(path))
    return path


def _reference(pt2: Path, x: np.ndarray) -> np.ndarray:
    ep = torch.export.load(str(pt2))
    with torch.no_grad():
        return ep.module()(torch.from_numpy(x)).numpy()


def test_compile_and_run_small_cnn(tmp_path, small_cnn_pt2):
    out = tmp_path / "ov"
    proc = run_cli("compile", small_cnn_pt2, "-b", "openvino", "-o", out, check=True)
    assert "backend openvino (openvino-cpu-f32)" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["checked"] and report["verification"]["relative_error"] <= 1e-4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["backend"] == "openvino" and "openvino" in manifest["versions"]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run_cli("run", out, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz", check=True)
    y = np.load(tmp_path / "y.npz")["output_0"]
    ref = _reference(small_cnn_pt2, x)
    assert np.linalg.norm(y - ref) <= 1e-4 * np.linalg.norm(ref)


@pytest.mark.slow
def test_compile_static_int8_with_calibration(tmp_path, small_cnn_pt2):
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "int8"
    proc = run_cli("compile", small_cnn_pt2, "-p", "fold-bn,quantize(mode=static)", "--calib", tmp_path / "calib.npz",
                   "-b", "openvino", "-o", out, check=True)
    assert "lossy pipeline" in proc.stdout
    facts = json.loads((out / "report.json").read_text())["artifact"]
    assert set(facts["runtime_precisions"]["Convolution"]) <= {"i8", "u8"}
    assert facts["lowering_check"]["relative_error"] <= facts["lowering_check"]["tolerance"]
    run_cli("run", out, "--random", "-o", tmp_path / "y.npz", check=True)


@pytest.mark.parametrize("flags, needle", [
    (("--precision", "fp8"), "valid precisions: f32, bf16, auto"),
    (("--target", "cuda"), "valid targets: auto, cpu, gpu"),
    (("--opset", "17"), "--opset does not apply to --backend openvino"),
    (("-p", "quantize(mode=weight-only,bits=4)"), "does not take weight-only quantized graphs"),
])
def test_bad_options_exit_2_before_the_capture(tmp_path, small_cnn_pt2, flags, needle):
    proc = run_cli("compile", small_cnn_pt2, "-b", "openvino", *flags, "-o", tmp_path / "x")
    assert_user_error(proc, needle)
    assert not (tmp_path / "x").exists()


def test_gpu_asked_but_absent_exits_2(tmp_path, small_cnn_pt2):
    import openvino

    if any(d.startswith("GPU") for d in openvino.Core().available_devices):
        pytest.skip("OpenVINO sees a GPU here")
    assert_user_error(run_cli("compile", small_cnn_pt2, "-b", "openvino", "--target", "gpu", "-o", tmp_path / "x"),
                      "OpenVINO sees no GPU")


def test_precision_flag_belongs_to_openvino(tmp_path, small_cnn_pt2):
    assert_user_error(run_cli("compile", small_cnn_pt2, "-b", "ort", "--precision", "bf16", "-o", tmp_path / "x"),
                      "--precision does not apply to --backend ort")
