"""Weight-only quantization of GPT-2's Conv1D layers (``addmm(bias, x, W[K, N])``): they
are rewritten to ``linear`` exactly, then quantized like any linear layer."""
from __future__ import annotations

import torch

from gradrewrite.compiler import run_pipeline
from gradrewrite.passes.quantize.layers import linear_form
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.graph import op_name
from gradrewrite.rewrite.quant_ops import GROUPWISE_LINEAR
from gradrewrite.rewrite.registry import PassContext
from tests.model_zoo import hf_gpt2


def _calib(example, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, example[0].shape, generator=g),) for _ in range(n)]


def test_addmm_becomes_linear_exactly():
    model, example = hf_gpt2()
    graph = capture(model, example)
    addmms = sum(op_name(n) == "aten.addmm" for n in graph.call_nodes())
    assert addmms == 8                                   # 2 blocks x (c_attn, c_proj, c_fc, c_proj)
    with torch.no_grad():
        ref = graph(*example)[0]
    done = linear_form(graph)
    assert len(done) == addmms and not any(op_name(n) == "aten.addmm" for n in graph.call_nodes())
    with torch.no_grad():
        torch.testing.assert_close(graph(*example)[0], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_gpt2_conv1d_layers_are_quantized():
    model, example = hf_gpt2()
    graph = capture(model, example)
    with torch.no_grad():
        held = _calib(example, 2, 9)
        refs = [graph(*x)[0] for x in held]
    q = graph.clone()
    res = run_pipeline(q, "quantize(mode=weight-only,bits=4,group=32,method=gptq)",
                       ctx=PassContext(calibration=_calib(example, 4, 1)))
    report = res.records[-1].report
    assert len(report["linearized"]) == 8
    paths = [l["path"] for l in report["layers"]]
    assert sum(p.endswith(("c_attn", "c_proj", "c_fc")) for p in paths) == 8
    assert sum(n.target == GROUPWISE_LINEAR for n in q.call_nodes()) >= 8
    with torch.no_grad():
        err = sum(float((q(*x)[0] - r).norm()) for x, r in zip(held, refs)) / sum(float(r.norm()) for r in refs)
    assert err < 0.1, err
