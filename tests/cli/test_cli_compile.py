"""`gradrewrite compile` / `run` / `passes` end to end on real files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from .conftest import run_cli


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_compile_run(tmp_path, convbn_pt2, convbn_model, backend):
    out = tmp_path / "out"
    proc = run_cli("compile", convbn_pt2, "--passes", "fold-bn,dce", "--backend", backend, "-o", out, check=True)
    assert f"wrote {out}" in proc.stdout and "nodes 11 -> 8" in proc.stdout
    assert "fold-bn" in proc.stderr          # progress went to stderr
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == backend and report["target"]
    assert [p["name"] for p in report["passes"]] == ["fold-bn", "dce"]
    assert report["passes"][0]["report"]["folded"] == 3 and report["passes"][0]["seconds"] >= 0
    assert report["nodes"] == {"before": 11, "after": 8}
    v = report["verification"]
    assert v["inputs_compared"] == 3 and v["relative_error"] < 1e-5 and v["max_abs_error"] < 1e-4
    assert v["checked"] is True and v["tolerance"] == 1e-4
    assert "aten.batch_norm" in (out / "graph_before.txt").read_text()
    assert (out / "graph_after.txt").read_text().count("aten.batch_norm") == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert str(convbn_pt2) in manifest["inputs"] and manifest["seed"] == 0

    x = torch.randn(2, 3, 12, 12)
    np.save(tmp_path / "x.npy", x.numpy())
    proc = run_cli("run", out, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz", check=True)
    assert "output_0: 2x5 float32" in proc.stdout
    y = np.load(tmp_path / "y.npz")["output_0"]
    ref = convbn_model(x).detach().numpy()
    assert np.abs(y - ref).max() <= 1e-5 * (1 + np.abs(ref).max())


@pytest.mark.slow
def test_recipe_and_dump(tmp_path, convbn_pt2):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "fold-bn"\nselect = "path:features.*"\n[[pass]]\nname = "dce"\n')
    out = tmp_path / "o"
    run_cli("compile", convbn_pt2, "--recipe", recipe, "-o", out, "--dump-graphs", "-q", check=True)
    assert sorted(p.name for p in (out / "graphs").iterdir()) == ["00-input.txt", "01-fold-bn.txt", "02-dce.txt"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["passes"][0]["report"]["folded"] == 2


@pytest.mark.slow
def test_run_random_and_npz(tmp_path, convbn_pt2):
    out = tmp_path / "o"
    run_cli("compile", convbn_pt2, "-o", out, "-q", check=True)
    run_cli("run", out, "--random", "-o", tmp_path / "a.npz", check=True)
    np.savez(tmp_path / "in.npz", x=np.ones((2, 3, 12, 12), np.float32))
    run_cli("run", out, "--input", tmp_path / "in.npz", "-o", tmp_path / "b.npz", check=True)
    assert np.load(tmp_path / "b.npz")["output_0"].shape == (2, 5)


@pytest.mark.slow
def test_passes_lists_options():
    proc = run_cli("passes", check=True)
    assert "fold-bn" in proc.stdout and "dce" in proc.stdout and "select" in proc.stdout
    listed = json.loads(run_cli("passes", "--json", check=True).stdout)
    assert listed["fold-bn"]["requires"] == ["eval-mode"]
    assert listed["fold-bn"]["options"][0]["name"] == "select"


def test_pickle_with_trust(tmp_path, convbn_model):
    path = tmp_path / "m.pt"
    torch.save(convbn_model, path)
    run_cli("compile", path, "--trust-pickle", "--input", "1x3x16x16", "-o", tmp_path / "o", "-q", check=True)
    assert json.loads((tmp_path / "o" / "report.json").read_text())["inputs"][0]["shape"] == [1, 3, 16, 16]


@pytest.mark.slow
def test_module_factory(tmp_path):
    (tmp_path / "factory_mod.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()\n")
    run_cli("compile", "--module", "factory_mod:build", "--input", "1x3x8x8", "-p", "fold-bn",
            "-b", "ort", "-o", tmp_path / "o", "-q", cwd=tmp_path, check=True)
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["nodes"] == {"before": 2, "after": 1}


@pytest.mark.slow
def test_onnx_input_to_both_backends(tmp_path, convbn_model):
    path = tmp_path / "m.onnx"
    torch.onnx.export(convbn_model, (torch.randn(1, 3, 12, 12),), str(path), dynamo=False, opset_version=17,
                      do_constant_folding=False, input_names=["image"])
    for backend in ("torch", "ort"):
        out = tmp_path / backend
        run_cli("compile", path, "-p", "fold-bn,dce", "-b", backend, "-o", out, "-q", check=True)
        rep = json.loads((out / "report.json").read_text())
        assert rep["inputs"][0]["name"] == "image" and rep["verification"]["relative_error"] < 1e-5
        assert rep["passes"][0]["report"]["folded"] >= 1   # BN kept by the legacy exporter without folding


@pytest.mark.slow
def test_tvm_backend_tunes_and_reuses_cache(tmp_path, convbn_pt2):
    cache = tmp_path / "cache"
    args = ("compile", convbn_pt2, "-p", "fold-bn", "-b", "tvm", "--tune-trials", "4", "--tune-cache", cache)
    first = run_cli(*args, "-o", tmp_path / "a", check=True)
    assert "TVM tuning: 4 trials" in first.stderr
    second = run_cli(*args, "-o", tmp_path / "b", check=True)
    assert "reusing 4 recorded trials" in second.stderr
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rep["backend"] == "tvm" and rep["verification"]["relative_error"] < 1e-5
    run_cli("run", tmp_path / "b", "--random", "-o", tmp_path / "y.npz", check=True)
    assert np.load(tmp_path / "y.npz")["output_0"].shape == (2, 5)
