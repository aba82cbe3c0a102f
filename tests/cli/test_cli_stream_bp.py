"""`gradrewrite compile --train --loss causal_lm -p stream-bp(...)` and `run` on its artifact.

The artifact's step (loss, then every trained parameter's gradient) is compared with
plain autograd on the eager module loaded from the same .pt2: fp32, relative error
||g - g_ref|| / ||g_ref|| < 1e-5 per parameter (rounding of a different summation order).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.models import tiny_gpt
from gradrewrite.passes.stream_bp import causal_lm_loss
from tests.cli.conftest import assert_user_error, run_cli

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 512


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """tiny_gpt.pt2 (as examples/make_models.py writes it) and its stream-bp artifact."""
    tmp = tmp_path_factory.mktemp("sbp")
    model, inputs = tiny_gpt()
    pt2 = tmp / "tiny_gpt.pt2"
    torch.export.save(torch.export.export(model, inputs), pt2)
    out = tmp / "step"
    run_cli("compile", pt2, "--train", "--loss", "causal_lm", "-p", "stream-bp(chunk=16,logits_chunk=16)",
            "-o", out, "-q", cwd=ROOT, check=True)
    return tmp, pt2, out


def autograd_step(pt2: Path, ids: np.ndarray, labels: np.ndarray) -> tuple[float, dict]:
    module = torch.export.load(str(pt2)).module()
    loss = causal_lm_loss(module(torch.from_numpy(ids)), torch.from_numpy(labels))
    loss.backward()
    return loss.item(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def test_report_records_the_gradient_check_and_chunking(compiled):
    _, _, out = compiled
    report = json.loads((out / "report.json").read_text())
    sbp = report["stream_bp"]
    assert sbp["gradient_check"]["max_relative_error"] < 1e-5
    assert (sbp["chunk"], sbp["logits_chunk"], sbp["layers"], sbp["chunks_per_layer"]) == (16, 16, 2, 4)
    assert sbp["op_kinds"]["causal"] == 2  # one causal attention per layer
    assert sbp["loss"] == "causal_lm" and sbp["outputs"][0] == "loss"
    assert all(v > 0 for v in sbp["gradient_check"]["peak_live_bytes"].values())
    assert report["artifact"]["files"] == ["model.pt2", "stream_bp.json"]
    assert [p["name"] for p in report["passes"]] == ["stream-bp"]


def test_run_is_one_step_equal_to_autograd(compiled):
    tmp, pt2, out = compiled
    gen = np.random.default_rng(3)
    ids = gen.integers(0, VOCAB, (1, 64), dtype=np.int64)
    labels = ids.copy()
    labels[0, :9] = -100  # a masked prompt: the normaliser counts valid shifted labels only
    np.save(tmp / "ids.npy", ids)
    np.save(tmp / "labels.npy", labels)
    outputs = json.loads((out / "report.json").read_text())["stream_bp"]["outputs"]
    for given, lab in ((["--labels", tmp / "labels.npy"], labels), ([], ids)):
        proc = run_cli("run", out, "--input", tmp / "ids.npy", *given, "-o", tmp / "o.npz", cwd=ROOT,
                       check=True)
        assert f"output_{len(outputs) - 1}" in proc.stdout
        got = np.load(tmp / "o.npz")
        ref_loss, ref = autograd_step(pt2, ids, lab)
        assert abs(float(got["output_0"]) - ref_loss) < 1e-5 * abs(ref_loss)
        assert set(ref) == {name.removeprefix("grad:") for name in outputs[1:]}
        for i, name in enumerate(outputs[1:], start=1):
            g = ref[name.removeprefix("grad:")]
            err = float(np.linalg.norm(got[f"output_{i}"] - g.numpy()) / g.norm())
            assert err < 1e-5, (name, err)


def test_module_factory_with_input_spec_and_uneven_chunks(tmp_path):
    out = tmp_path / "step"
    run_cli("compile", "--module", "examples.models:tiny_gpt", "--input", f"2x40:int64:{VOCAB}", "--train",
            "--loss", "causal_lm", "-p", "dce,stream-bp(chunk=7,logits_chunk=9)", "-o", out, "-q", cwd=ROOT,
            check=True)
    sbp = json.loads((out / "report.json").read_text())["stream_bp"]
    assert sbp["gradient_check"]["batch"] == [2, 40] and sbp["chunks_per_layer"] == 6
    assert sbp["gradient_check"]["max_relative_error"] < 1e-5


@pytest.mark.slow
def test_bad_requests_are_one_line_errors(compiled, tmp_path):
    _, pt2, out = compiled
    o = tmp_path / "o"
    assert_user_error(run_cli("compile", pt2, "--train", "--loss", "causal_lm", "-o", o, cwd=ROOT),
                      "needs the stream-bp pass")
    assert_user_error(run_cli("compile", pt2, "--train", "--loss", "mse", "-p", "stream-bp", "-o", o, cwd=ROOT),
                      "--loss causal_lm")
    (tmp_path / "bidir_lm.py").write_text(
        "import torch\nimport torch.nn.functional as F\n\n"
        "class BidirectionalLM(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(32, 16)\n"
        "        self.qkv = torch.nn.Linear(16, 48)\n"
        "        self.head = torch.nn.Linear(16, 32)\n\n"
        "    def forward(self, ids):\n"
        "        q, k, v = self.qkv(self.emb(ids)).unsqueeze(1).chunk(3, dim=-1)\n"
        "        return self.head(F.scaled_dot_product_attention(q, k, v).squeeze(1))\n\n"
        "def build():\n"
        "    return BidirectionalLM().eval(), (torch.randint(0, 32, (1, 12)),)\n")
    assert_user_error(run_cli("compile", "--module", "bidir_lm:build", "--train", "--loss", "causal_lm",
                              "-p", "stream-bp", "-o", o, cwd=tmp_path),
                      "aten.scaled_dot_product_attention", "non-causal")
    assert not o.exists()
    np.save(tmp_path / "ids.npy", np.zeros((1, 64), dtype=np.int64))
    np.save(tmp_path / "short.npy", np.zeros((1, 10), dtype=np.int64))
    assert_user_error(run_cli("run", out, "--input", tmp_path / "ids.npy", "--labels", tmp_path / "short.npy",
                              "-o", tmp_path / "r.npz", cwd=ROOT), "shaped like the input")
    assert not (tmp_path / "r.npz").exists()


HF_LM = """import torch
import transformers as tr


def build():
    torch.manual_seed(0)
    model = tr.LlamaForCausalLM(tr.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, use_cache=False, attn_implementation="eager"))
    return model.eval(), (torch.randint(0, 64, (1, 20)),)
"""


def test_module_returning_a_model_output(tmp_path, monkeypatch):
    """A transformers model (it returns a CausalLMOutputWithPast) with eager attention:
    the logits are taken from the output, in the compile-time check and in `run`."""
    (tmp_path / "hf_lm.py").write_text(HF_LM)
    out = tmp_path / "step"
    run_cli("compile", "--module", "hf_lm:build", "--train", "--loss", "causal_lm",
            "-p", "stream-bp(chunk=7,logits_chunk=9)", "-o", out, "-q", cwd=tmp_path, check=True)
    sbp = json.loads((out / "report.json").read_text())["stream_bp"]
    assert sbp["gradient_check"]["max_relative_error"] < 1e-5
    assert sbp["layers"] == 2 and sbp["op_kinds"]["causal"] == 4   # softmax and P @ V per layer
    ids = np.random.default_rng(5).integers(0, 64, (1, 20), dtype=np.int64)  # the compiled shape
    np.save(tmp_path / "ids.npy", ids)
    run_cli("run", out, "--input", tmp_path / "ids.npy", "-o", tmp_path / "o.npz", cwd=tmp_path, check=True)
    got = np.load(tmp_path / "o.npz")
    monkeypatch.syspath_prepend(str(tmp_path))
    import hf_lm

    model, _ = hf_lm.build()
    loss = causal_lm_loss(model(torch.from_numpy(ids)).logits, torch.from_numpy(ids))
    loss.backward()
    assert abs(float(got["output_0"]) - loss.item()) < 1e-5 * loss.item()
    for i, name in enumerate(sbp["outputs"][1:], start=1):
        g = dict(model.named_parameters())[name.removeprefix("grad:")].grad
        assert float(np.linalg.norm(got[f"output_{i}"] - g.numpy()) / g.norm()) < 1e-5, name
