"""The runnable examples users copy from keep working."""
from __future__ import annotations

import pytest

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_custom_pass_example():
    sys.path.insert(0, str(ROOT))
    from examples import custom_pass

    import gradrewrite as gr

    g = gr.capture(custom_pass.Net(), (torch.randn(4, 8),))
    rec = gr.run_pipeline(g, "simplify-activations").records[0]
    assert rec.report["fired"] == {"relu-relu": 1, "clamp-after-bounded-activation": 1}
    assert rec.report["skipped"] == {"clamp-after-bounded-activation": {"clamp is tighter than the activation's range": 1}}
    x = torch.randn(4, 8)
    torch.testing.assert_close(g(x)[0], custom_pass.Net()(x), rtol=0, atol=0)


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "fold-bn: 153 -> 101 nodes" in proc.stdout and "top-1 class" in proc.stdout
    assert (tmp_path / "out" / "model.onnx").exists()
