"""--backend auto: every candidate built, verified and timed; the fastest correct one kept."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import gradrewrite as gr
from tests.small_models import Eig, Mlp
from gradrewrite.cli import main
from gradrewrite.backends.base import backend_available
from gradrewrite.errors import ConfigError

# openvino is a candidate where it is installed (CI installs it)
CANDIDATES = {"torch", "ort", "tvm"} | ({"openvino"} if backend_available("openvino") else set())


def _tvm(tmp_path):
    return {"tune_trials": 4, "tune_cache": str(tmp_path / "tvm-cache"), "target": "llvm"}


@pytest.mark.slow
def test_auto_picks_fastest_correct_backend(tmp_path):
    torch.manual_seed(0)
    model = Mlp().eval()
    art = gr.compile(model, tmp_path / "out", example_inputs=(torch.randn(2, 16),), passes="fold-bn,dce",
                     backend="auto", backend_options={"tvm": _tvm(tmp_path)}, latency_runs=10)
    table = art.report["auto"]
    rows = {r["backend"]: r for r in table["candidates"]}
    assert set(rows) == CANDIDATES
    assert all(r["ok"] and r["error"] is None for r in rows.values()), rows
    assert all(r["relative_error"] <= 1e-4 and r["median_ms"] > 0 and r["target"] for r in rows.values())
    chosen = table["chosen"]
    assert rows[chosen]["median_ms"] == min(r["median_ms"] for r in rows.values())
    assert art.backend == chosen and art.report["target"] == rows[chosen]["target"]
    assert "fastest correct" in table["reason"]
    # only the winner's files are in OUT, and the artifact runs like the model
    assert not (art.path / ".auto").exists()
    assert set(art.report["artifact"]["files"]) <= {p.name for p in art.path.iterdir()}
    x = torch.randn(2, 16)
    with torch.no_grad():
        ref = model(x).numpy()
    assert abs(art(x)[0] - ref).max() < 1e-4
    # each backend got only its own options (tvm's tune_trials reached tvm alone)
    if chosen == "tvm":
        assert art.report["artifact"]["tune_trials"] == 4
    manifest_opts = art.manifest["config"]["backend_options"]
    assert manifest_opts["tvm"]["tune_trials"] == 4 and art.manifest["config"]["backend"] == "auto"


def test_auto_skips_a_backend_that_cannot_lower(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4)
    art = gr.compile(Eig().eval(), tmp_path / "out", example_inputs=(x,), backend="auto",
                     backend_options={"tvm": _tvm(tmp_path)}, latency_runs=5)
    table = art.report["auto"]
    rows = {r["backend"]: r for r in table["candidates"]}
    assert set(rows) == CANDIDATES
    assert not rows["ort"]["ok"] and rows["ort"]["error"] and rows["ort"]["median_ms"] is None
    assert rows["torch"]["ok"]
    assert table["chosen"] in {n for n, r in rows.items() if r["ok"]}
    assert "skipped" in table["reason"] and "ort" in table["reason"]


def test_auto_options_must_be_grouped_per_backend(tmp_path):
    with pytest.raises(ConfigError, match="grouped per backend"):
        gr.compile(Mlp().eval(), tmp_path / "out", example_inputs=(torch.randn(2, 16),), backend="auto",
                   backend_options={"tune_trials": 4})
    assert not (tmp_path / "out").exists()


def test_cli_auto_routes_flags_and_reports_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADREWRITE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = Mlp().eval()
    ep = torch.export.export(model, (torch.randn(2, 16),))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    res = CliRunner().invoke(main, ["compile", str(tmp_path / "m.pt2"), "-p", "fold-bn,dce", "-b", "auto",
                                    "--tune-trials", "0", "--opset", "18", "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert f"auto chose {report['auto']['chosen']}" in res.output
    assert report["backend"] == report["auto"]["chosen"]
    assert len(report["auto"]["candidates"]) == len(CANDIDATES)
    opts = json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["backend_options"]
    assert opts["tvm"] == {"tune_trials": 0} and opts["ort"] == {"opset": 18} and opts.get("torch", {}) == {}
