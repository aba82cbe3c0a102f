"""`gradrewrite compile --train`: a training-step artifact with its memory plan."""
from __future__ import annotations

import pytest

import json

import numpy as np

from tests.cli.conftest import assert_user_error, run_cli

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_compile_train_sparse_update_writes_memory_plan(tmp_path):
    out = tmp_path / "step"
    run_cli("compile", "--module", "examples.models:small_cnn", "--train", "--lr", "0.05",
            "-p", "fold-bn,sparse-update(bias_last=2,weights='-1:1/2')", "-o", out, "-q", cwd=ROOT,
            check=True)
    report = json.loads((out / "report.json").read_text())
    mem = report["memory_plan"]
    assert mem["sram_bytes"] == mem["arena_bytes"] + mem["trained_weights_bytes"] + mem["inputs_bytes"]
    # fold-bn ran on the inference graph before capture: the folded convs now have biases
    assert report["train_step"]["captured_after"] == ["fold-bn"]
    # checked against the rewritten step, even though sparse-update changes what moves
    assert report["verification"]["checked"] is True
    assert [p["name"] for p in report["passes"]] == ["sparse-update"]
    outputs = report["train_step"]["outputs"]
    assert outputs[0] == "loss" and set(outputs[1:]) == {"conv.0.bias", "fc.weight", "fc.bias"}
    assert [i["name"] for i in report["inputs"]][-1] == "labels"
    # one call of the artifact = one step: loss, then the updated parameters
    proc = run_cli("run", out, "--random", "-o", tmp_path / "o.npz", cwd=ROOT, check=True)
    outs = np.load(tmp_path / "o.npz")
    shapes = {what: outs[f"output_{i}"].shape for i, what in enumerate(outputs)}
    assert shapes["loss"] == () and shapes["fc.weight"] == (10, 64)
    assert "output_3" in proc.stdout


def test_inspect_train_shows_memory_plan():
    proc = run_cli("inspect", "--module", "examples.models:small_cnn", "--train", "-p",
                   "sparse-update(bias_last=1)", cwd=ROOT, check=True)
    assert "memory plan: arena" in proc.stderr and "fc_bias_grad" in proc.stdout


@pytest.mark.slow
def test_train_errors(tmp_path):
    proc = run_cli("compile", "--module", "examples.models:small_cnn", "--train", "-p",
                   "sparse-update(weights='classifier.99:1')", "-o", tmp_path / "x", "-q", cwd=ROOT)
    assert_user_error(proc, "no conv/linear layer 'classifier.99'")
    assert not (tmp_path / "x").exists()
    proc = run_cli("compile", "--module", "examples.models:small_cnn", "--train", "-p",
                   "sparse-update(budget='1KB')", "-o", tmp_path / "y", "-q", cwd=ROOT)
    assert_user_error(proc, "too small", "give budget >=")
    proc = run_cli("compile", "--module", "examples.models:small_cnn", "--label", "1:int64",
                   "-o", tmp_path / "z", "-q", cwd=ROOT)
    assert_user_error(proc, "--label applies only with --train")
