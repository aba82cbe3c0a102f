"""Python API parity: one ``gr.compile`` call does what ``gradrewrite compile`` does,
training steps included, and writes the same artifact (same files, same report numbers)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gradrewrite as gr
from tests.cli.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]

# Facts that differ between two identical compiles: clocks, and where the files are.
VOLATILE = {"seconds", "build_seconds", "latency_ms", "created_unix", "source", "memory",  # memory: measured peak RSS
            "timings"}  # mcu: wall and CPU seconds per compile phase
# fp32 rounding measures: their last digits follow the summation order, which the thread
# count of the process (CLI subprocess vs the test's own) may change
ROUNDING = {"max_relative_error", "max_abs_error", "max_abs_diff", "relative_error"}


def _stable(obj):
    if isinstance(obj, dict):
        return {k: (_magnitude(v) if k in ROUNDING else _stable(v)) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def _magnitude(v):
    """A rounding-level error compared only as 'within fp32 rounding' or not."""
    return v < 1e-4 if isinstance(v, float) else v


def _same_artifact(cli_out: Path, api_out: Path) -> None:
    cli_report = json.loads((cli_out / "report.json").read_text())
    api_report = json.loads((api_out / "report.json").read_text())
    assert sorted(p.name for p in cli_out.rglob("*")) == sorted(p.name for p in api_out.rglob("*"))
    assert _stable(cli_report) == _stable(api_report)
    cli_hashes = json.loads((cli_out / "manifest.json").read_text())["outputs"]
    api_hashes = json.loads((api_out / "manifest.json").read_text())["outputs"]
    # the generated sources and the config are byte for byte the same
    for name, digest in cli_hashes.items():
        if name.endswith((".c", ".h", ".json")) and name != "report.json":
            assert api_hashes[name] == digest, name


@pytest.mark.slow
def test_mcu_training_step_through_the_api_equals_the_cli(tmp_path):
    passes = "fold-bn,sparse-update(bias_last=2,weights='-1:1,-2:1/2')"
    run_cli("compile", "--module", "examples.models:small_cnn", "--train", "--lr", "0.05", "--momentum", "0.9",
            "-p", passes, "--backend", "mcu", "--target", "host", "-o", tmp_path / "cli", "-q", cwd=ROOT,
            check=True)
    graph = gr.load(module="examples.models:small_cnn")  # the CLI's capture, so the same source names
    art = gr.compile(graph, tmp_path / "api", passes=passes, backend="mcu",
                     train=gr.Train(loss="cross_entropy", lr=0.05, momentum=0.9), target="host")
    assert art.report["train_step"]["optimizer"]["momentum"] == 0.9
    _same_artifact(tmp_path / "cli", tmp_path / "api")


def test_stream_bp_step_through_the_api_equals_the_cli(tmp_path):
    from examples.models import tiny_gpt

    model, inputs = tiny_gpt()
    pt2 = tmp_path / "tiny_gpt.pt2"
    torch.export.save(torch.export.export(model, inputs), pt2)
    passes = "stream-bp(chunk=16,logits_chunk=16)"
    run_cli("compile", pt2, "--train", "--loss", "causal_lm", "-p", passes, "-o", tmp_path / "cli", "-q",
            cwd=ROOT, check=True)
    art = gr.compile(gr.load(pt2), tmp_path / "api", passes=passes, train=gr.Train(loss="causal_lm"))
    assert art.report["stream_bp"]["gradient_check"]["max_relative_error"] < 1e-5
    _same_artifact(tmp_path / "cli", tmp_path / "api")
    # and it runs through the same Artifact as every other kind
    ids = inputs[0].numpy()
    loss, *grads = art(ids)
    assert loss.shape == () and len(grads) == len(art.report["stream_bp"]["outputs"]) - 1


def test_backend_options_are_typed_and_checked(tmp_path, convbn_model):
    from gradrewrite.errors import ConfigError

    x = (torch.randn(2, 3, 12, 12),)
    with pytest.raises(ConfigError, match="valid options: .*opset"):
        gr.compile(convbn_model, tmp_path / "o", example_inputs=x, backend="ort", tune_trials=3)
    with pytest.raises(ConfigError, match="ram_kb"):
        gr.compile(convbn_model, tmp_path / "o", example_inputs=x, backend="mcu", ram_kb="lots")
    assert not (tmp_path / "o").exists()
    art = gr.compile(convbn_model, tmp_path / "o", example_inputs=x, backend="ort", opset=18)
    assert art.manifest["config"]["backend_options"]["opset"] == 18


def test_training_flags_without_train_are_refused(tmp_path, convbn_model):
    from gradrewrite.errors import ConfigError

    with pytest.raises(ConfigError, match="causal_lm"):
        gr.compile(convbn_model, tmp_path / "o", example_inputs=(torch.randn(2, 3, 12, 12),),
                   passes="stream-bp")
