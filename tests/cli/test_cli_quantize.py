"""`gradrewrite compile/inspect --passes quantize(...) --calib FILE` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from .conftest import assert_user_error, run_cli


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 32)
        self.out = torch.nn.Linear(32, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        return self.out(torch.relu(self.fc(y)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    model = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), str(d / "net.pt2"))
    g = torch.Generator().manual_seed(1)
    np.savez(d / "calib.npz", x=torch.randn(6, 3, 8, 8, generator=g).numpy())  # 6 samples of 1x3x8x8
    torch.save(torch.randn(4, 1, 3, 8, 8, generator=g), d / "calib.pt")
    np.savez(d / "bad.npz", x=np.zeros((4, 3, 5, 5), np.float32))
    np.save(d / "x.npy", torch.randn(1, 3, 8, 8, generator=g).numpy())
    return d, model


@pytest.mark.slow
def test_static_int8_compile_run(files, tmp_path):
    d, model = files
    out = tmp_path / "int8"
    proc = run_cli("compile", d / "net.pt2", "--passes", "quantize(observer=percentile)", "--calib",
                   d / "calib.npz", "--backend", "ort", "-o", out, check=True)
    assert "lossy pipeline" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    q = report["passes"][0]["report"]
    assert q["mode"] == "static" and q["calibration_samples"] == 6
    assert [e["path"] for e in q["error_report"]] == ["conv", "fc", "out"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(report["artifact"]["onnx_ops"])
    run_cli("run", out, "--input", d / "x.npy", "-o", tmp_path / "y.npz", check=True)
    y = np.load(tmp_path / "y.npz")["output_0"]
    ref = model(torch.from_numpy(np.load(d / "x.npy"))).detach().numpy()
    assert np.abs(y - ref).max() < 0.1 * np.abs(ref).max() + 0.02


@pytest.mark.slow
def test_weight_only_gradient_compile_and_inspect_table(files, tmp_path):
    d, _ = files
    passes = "quantize(bits=4,group=16,outliers=0.05,criterion=gradient,aggregation=square,select=op:linear)"
    out = tmp_path / "w4"
    run_cli("compile", d / "net.pt2", "--passes", passes, "--calib", d / "calib.pt", "-o", out, "-q", check=True)
    q = json.loads((out / "report.json").read_text())["passes"][0]["report"]
    assert q["criterion"] == "gradient" and q["loss"] == "mse" and q["calibration_samples"] == 4
    assert {l["path"]: l["outliers"] for l in q["layers"]} == {"fc": round(0.05 * 256), "out": round(0.05 * 128)}
    assert q["skipped"] == []     # the conv is not selected, so not reported as skipped
    proc = run_cli("inspect", d / "net.pt2", "--passes", passes, "--calib", d / "calib.pt", check=True)
    assert "per-layer output error" in proc.stdout and "SQNR dB" in proc.stdout
    assert "gradrewrite.groupwise_linear" in proc.stdout


@pytest.mark.slow
def test_bad_quantize_input_writes_nothing(files, tmp_path):
    d, _ = files
    out = tmp_path / "none"
    assert_user_error(run_cli("compile", d / "net.pt2", "--passes", "quantize", "-o", out),
                      "needs calibration data", "--calib")
    assert_user_error(run_cli("compile", d / "net.pt2", "--passes", "quantize", "--calib", d / "bad.npz",
                              "-o", out), "expected N x 1x3x8x8")
    assert_user_error(run_cli("compile", d / "net.pt2", "--passes", "quantize(bits=4,group=12)",
                              "-o", out), "group=12 is out of range")
    assert_user_error(run_cli("compile", d / "net.pt2", "--passes", "quantize(bits=4,select=path:nope)",
                              "-o", out), "matches no layer")
    assert_user_error(run_cli("compile", d / "net.pt2", "--passes", "quantize", "--calib",
                              d / "missing.npz", "-o", out), "does not exist")
    assert not out.exists() and not list(tmp_path.glob(".none*"))


BERT = '''
import torch
from transformers import BertConfig, BertModel

class Encoder(torch.nn.Module):
    """ids [B, T] -> hidden states [B, T, H]: an encoder, not a language model."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)
        self.bert = BertModel(cfg, add_pooling_layer=False).eval()
    def forward(self, input_ids):
        return self.bert(input_ids=input_ids).last_hidden_state

def factory():
    return Encoder(), (torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1)),)
'''


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    (d / "bert.py").write_text(BERT)
    ids = np.random.default_rng(2).integers(0, 300, (4, 2, 16))   # 4 samples of [2, 16] ids
    np.savez(d / "calib.npz", input_ids=ids.astype(np.int64))
    return d


def test_encoder_gradient_outliers_choose_output_distance(bert_files, tmp_path):
    """An encoder's ids are not next-token targets: loss=auto must not use causal-lm (it used to
    fail with 'Target 243 is out of bounds') and must say what it chose and why."""
    d = bert_files
    passes = "quantize(mode=weight-only,bits=4,group=32,outliers=0.01,criterion=gradient)"
    out = tmp_path / "q"
    run_cli("compile", "--module", "bert:factory", "--passes", passes, "--calib", d / "calib.npz",
            "-b", "torch", "-o", out, "-q", cwd=d, check=True)
    q = json.loads((out / "report.json").read_text())["passes"][0]["report"]
    assert q["loss"] == "mse" and q["criterion"] == "gradient"
    assert "not vocabulary-wide" in q["loss_reason"] and "300 rows" in q["loss_reason"]
    assert all(l["outliers"] > 0 for l in q["layers"])


def test_encoder_with_causal_lm_loss_is_one_line(bert_files, tmp_path):
    d = bert_files
    out = tmp_path / "q"
    passes = "quantize(mode=weight-only,bits=4,outliers=0.01,criterion=gradient,loss=causal-lm)"
    assert_user_error(run_cli("compile", "--module", "bert:factory", "--passes", passes, "--calib",
                              d / "calib.npz", "-o", out, cwd=d),
                      "loss=causal-lm needs a language model", "loss=mse")
    assert not out.exists()
