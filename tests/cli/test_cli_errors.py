"""Every bad input: one line naming the problem and the fix, exit 2, no OUT left."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from .conftest import assert_user_error, run_cli


def no_out(tmp_path, name="o"):
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((name, f".{name}"))]
    assert leftovers == [], leftovers


def test_missing_file(tmp_path):
    assert_user_error(run_cli("compile", tmp_path / "nope.pt2", "-o", tmp_path / "o"), "does not exist")
    no_out(tmp_path)


def test_truncated_pt2(tmp_path, convbn_pt2):
    bad = tmp_path / "cut.pt2"
    bad.write_bytes(convbn_pt2.read_bytes()[:2000])
    assert_user_error(run_cli("compile", bad, "-o", tmp_path / "o"), "cut.pt2")
    no_out(tmp_path)


def test_unknown_format(tmp_path):
    f = tmp_path / "model.tflite"
    f.write_bytes(b"\x00" * 10)
    assert_user_error(run_cli("compile", f, "-o", tmp_path / "o"), "unknown model format", ".pt2")


def test_pickle_without_trust(tmp_path, convbn_model):
    path = tmp_path / "m.pth"
    torch.save(convbn_model, path)
    assert_user_error(run_cli("compile", path, "--input", "1x3x8x8", "-o", tmp_path / "o"),
                      "runs arbitrary code", "--trust-pickle")
    no_out(tmp_path)


@pytest.mark.parametrize("spec,needle", [("1x3xfoo", "bad --input spec"), ("1x3x8x8:complex7", "unknown dtype"),
                                         ("1x4x8x8", "3 channels")])
def test_bad_input_spec(tmp_path, convbn_pt2, spec, needle):
    assert_user_error(run_cli("compile", convbn_pt2, "--input", spec, "-o", tmp_path / "o"), needle)
    no_out(tmp_path)


def test_unknown_pass(tmp_path, convbn_pt2):
    assert_user_error(run_cli("compile", convbn_pt2, "-p", "fold-bn,quantise", "-o", tmp_path / "o"),
                      "unknown pass 'quantise'", "valid passes:", "dce", "fold-bn")
    no_out(tmp_path)


def test_unknown_option(tmp_path, convbn_pt2):
    assert_user_error(run_cli("compile", convbn_pt2, "-p", "fold-bn(bits=4)", "-o", tmp_path / "o"),
                      "no option 'bits'", "valid options: select")


def test_selector_matches_nothing(tmp_path, convbn_pt2):
    line = assert_user_error(run_cli("compile", convbn_pt2, "-p", "dce,fold-bn(select='path:encoder.*')",
                                     "-o", tmp_path / "o"), "matches no layer", "pass 'fold-bn' (after dce)")
    assert "features.0" in line
    no_out(tmp_path)


def test_unknown_backend(tmp_path, convbn_pt2):
    assert_user_error(run_cli("compile", convbn_pt2, "-b", "tensorrt", "-o", tmp_path / "o"),
                      "unknown backend", "ort", "torch")


def test_op_backend_cannot_run(tmp_path):
    (tmp_path / "weird_mod.py").write_text(
        "import torch\n"
        "class W(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.linalg.eigvals(x).real\n"
        "def build():\n"
        "    return W(), (torch.randn(3, 3),)\n")
    assert_user_error(run_cli("compile", "--module", "weird_mod:build", "-b", "ort", "-o", tmp_path / "o",
                              cwd=tmp_path), "no ONNX lowering for aten.linalg_eig", "--backend torch")
    no_out(tmp_path)


def test_existing_out(tmp_path, convbn_pt2):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    assert_user_error(run_cli("compile", convbn_pt2, "-o", tmp_path / "o"), "already exists", "--force")
    assert (tmp_path / "o" / "keep.txt").exists()


def test_bad_recipe(tmp_path, convbn_pt2):
    r = tmp_path / "r.toml"
    r.write_text("[[pass]\n")
    assert_user_error(run_cli("compile", convbn_pt2, "--recipe", r, "-o", tmp_path / "o"), "not valid TOML")


@pytest.mark.slow
def test_run_errors(tmp_path, convbn_pt2):
    assert_user_error(run_cli("run", tmp_path), "not a gradrewrite artifact")
    out = tmp_path / "art"
    run_cli("compile", convbn_pt2, "-o", out, "-q", check=True)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 12, 12), np.float32))
    assert_user_error(run_cli("run", out, "--input", tmp_path / "x.npy"), "compiled for 2x3x12x12:float32")
    (tmp_path / "bad.npy").write_text("garbage")
    assert_user_error(run_cli("run", out, "--input", tmp_path / "bad.npy"), "cannot read")
    assert_user_error(run_cli("run", out), "--random")


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("--debug", "compile", tmp_path / "nope.pt2", "-o", tmp_path / "o")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_corrupt_onnx(tmp_path):
    f = tmp_path / "m.onnx"
    f.write_text("this is not protobuf")
    assert_user_error(run_cli("compile", f, "-o", tmp_path / "o"), "m.onnx")
    no_out(tmp_path)


def test_flag_for_another_backend(tmp_path, convbn_pt2):
    assert_user_error(run_cli("compile", convbn_pt2, "-b", "ort", "--tune-trials", "8", "-o", tmp_path / "o"),
                      "--tune-trials does not apply to --backend ort")
