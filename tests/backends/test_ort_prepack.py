"""Which ORT sessions prepack their weights (``ort._prepack_is_cheap``): a model with an
external data file whose float matmuls would be copied by packing loads unpacked (a tied
fp32 LM head must stay one tensor), while a 4-bit one prepacks (MatMulNBits unpacks its
codes on every call otherwise: ~10x slower); small models always prepack. And the
compile's quick timing stops early for a slow model (``compiler._latency``)."""
from __future__ import annotations

import time

import pytest
import torch

import gradrewrite as gr
from gradrewrite import compiler
from gradrewrite.rewrite.capture import capture
from tests.model_zoo import hf_gpt2, hf_llama


@pytest.mark.parametrize("make, passes, external, prepack", [
    (hf_llama, None, False, True),                             # small model: always
    (hf_llama, None, True, False),                             # fp32 matmuls in external data: never
    (hf_llama, "quantize(bits=4,group=32)", True, True),       # 4-bit matmuls: the packed blob is small
    (hf_gpt2, "quantize(bits=4,group=32)", True, False),       # the tied head stays an fp32 matmul
])
def test_prepack_decision(tmp_path, make, passes, external, prepack):
    model, inputs = make(seq=8)
    out = tmp_path / "out"
    art = gr.compile(capture(model, inputs), out, passes=passes or None, backend="ort",
                     backend_options={"external_data": external}, latency_runs=2)
    report = art.report
    assert (out / "model.onnx.data").exists() == external
    assert report["artifact"]["prepack"] is prepack
    if passes:
        assert "MatMulNBits" in report["artifact"]["onnx_ops"]
    again = gr.Artifact(out)(*[t.numpy() for t in inputs])[0]   # loaded as the report says
    assert again.shape == tuple(model(*inputs).shape)


def test_latency_budget_stops_a_slow_model(monkeypatch):
    monkeypatch.setattr(compiler, "LATENCY_BUDGET_S", 0.05)
    monkeypatch.setattr(compiler, "LATENCY_SLOW_RUN_S", 0.01)
    calls = []

    def slow(*_):
        calls.append(1)
        time.sleep(0.03)

    graph = capture(torch.nn.Linear(4, 4), (torch.randn(1, 4),))
    got = compiler._latency(slow, graph, runs=20)
    assert got["runs"] == compiler.LATENCY_MIN_RUNS      # the budget was spent after the minimum
    assert len(calls) == 1 + compiler.LATENCY_MIN_RUNS   # one warm-up run for a slow model
    fast = compiler._latency(lambda *_: None, graph, runs=20)
    assert fast["runs"] == 20
