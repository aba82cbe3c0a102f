"""GWQ's gradient criterion by a streamed backward, one decoder layer at a time
(quantize(criterion=gradient, layerwise=auto|on|off)): the per-layer gradients against
autograd through the whole model, and the selected outliers / stored weights against the
whole-graph path."""
from __future__ import annotations

import sys

import pytest
import torch

from gradrewrite.compiler import run_pipeline
from gradrewrite.errors import ConfigError
from gradrewrite.passes.quantize.gradient_layerwise import gradient_stack, layerwise_gradient_scores
from gradrewrite.passes.quantize.layers import find_layers
from gradrewrite.passes.quantize.outliers import gradient_scores
from gradrewrite.passes.quantize.weight_only import rtn_dequantized
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.registry import PassContext
from tests.passes.test_quantize_gptq_layerwise import no_stack_graph, phase_peaks

transformers = pytest.importorskip("transformers")

VOCAB, TOKENS = 128, 12


def _model(kind: str):
    common = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False, use_cache=False,
                  initializer_range=48 ** -0.5)
    torch.manual_seed(0 if kind == "llama" else 1)
    model = (transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)) if kind == "llama" else
             transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))).eval()
    return capture(model, (torch.randint(0, VOCAB, (1, TOKENS)),))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lm(request):
    return _model(request.param)


def _calibration(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (1, TOKENS), generator=g),) for _ in range(n)]


@pytest.mark.parametrize("loss,aggregation", [("causal-lm", "abs"), ("causal-lm", "square"), ("mse", "abs")])
def test_streamed_gradients_equal_autograd(lm, loss, aggregation):
    layers, _ = find_layers(lm, "op:linear", "", kinds=("linear",), what="test")
    stack, reason = gradient_stack(lm, layers, "auto")
    assert stack is not None and stack.count == 3, reason
    opts = dict(loss=loss, aggregation=aggregation, rtn=lambda w: rtn_dequantized(w, 4, 16))
    full = gradient_scores(lm, layers, _calibration(), **opts)
    streamed = layerwise_gradient_scores(lm, stack, layers, _calibration(), **opts)
    assert sorted(full) == sorted(streamed) and len(full) == 22   # 7 linears x 3 layers + lm_head
    for key in full:
        assert float(full[key].abs().max()) > 0, key
        torch.testing.assert_close(streamed[key], full[key], rtol=1e-4, atol=1e-6 * float(full[key].abs().max()))


def test_streamed_gradient_with_a_loss_callable(lm):
    """A user loss on the outputs works through the head; scores from other calibration
    samples differ at this tolerance (the comparison discriminates)."""
    layers, _ = find_layers(lm, "op:linear", "", kinds=("linear",), what="test")
    stack, _ = gradient_stack(lm, layers, "auto")
    opts = dict(loss=lambda out, inputs: (out[0][:, -1] ** 2).mean(), aggregation="abs", rtn=lambda w: w)
    full = gradient_scores(lm, layers, _calibration(2), **opts)
    streamed = layerwise_gradient_scores(lm, stack, layers, _calibration(2), **opts)
    for key in full:
        torch.testing.assert_close(streamed[key], full[key], rtol=1e-4, atol=1e-6 * float(full[key].abs().max()))
    other = layerwise_gradient_scores(lm, stack, layers, _calibration(2, seed=7), **opts)
    assert not torch.allclose(other["model.layers.0.mlp.down_proj.weight"],
                              full["model.layers.0.mlp.down_proj.weight"], rtol=1e-3)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_artifact_equals_the_whole_graph_path(lm, method):
    pipe = f"quantize(bits=4,group=16,method={method},outliers=0.02,criterion=gradient,damp=0.01,{{}})"
    out, reports = {}, {}
    for layerwise in ("off", "auto"):
        q = lm.clone()
        res = run_pipeline(q, pipe.format(f"layerwise={layerwise}"), verify=False,
                           ctx=PassContext(calibration=_calibration(), seed=0))
        out[layerwise], reports[layerwise] = q, res.records[-1].report
    assert reports["off"]["gradient_calibration"] == {"path": "whole-graph", "reason": "layerwise=off"}
    assert reports["auto"]["gradient_calibration"]["path"] == "layer-wise"
    assert reports["auto"]["gradient_calibration"]["layers"] == 3
    a, b = out["off"].gm.state_dict(), out["auto"].gm.state_dict()
    assert sorted(a) == sorted(b) and any(k.endswith("_outlier_values") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [l["outliers"] for l in reports["off"]["layers"]] == [l["outliers"] for l in reports["auto"]["layers"]]


def test_layerwise_on_without_a_stack_is_a_config_error():
    graph, calib = no_stack_graph(3)
    with pytest.raises(ConfigError, match="layerwise=on: no stack of >= 2 repeated layers"):
        run_pipeline(graph.clone(), "quantize(bits=4,group=32,outliers=0.01,criterion=gradient,layerwise=on)",
                     ctx=PassContext(calibration=calib))
    res = run_pipeline(graph.clone(), "quantize(bits=4,group=32,outliers=0.01,criterion=gradient)",
                       ctx=PassContext(calibration=calib))
    assert res.records[-1].report["gradient_calibration"]["path"] == "whole-graph"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM / clear_refs are Linux's")
def test_streamed_gradient_memory_stays_bounded(tmp_path):
    """Subprocesses take GWQ gradient outliers (mse loss: the stack is not an LM) over 192 MiB of
    memory-mapped fp32 weights, both ways. From the start of the gradients, the whole-graph
    path's peak RSS rises by its copy of the model, the RTN'd weights as parameters and the
    summed scores of every layer (measured 2.2x the weights); the streamed backward's by one
    layer's weights, gradients and scores, the RTN codes and what the allocator keeps of the
    per-layer temporaries (measured 1.25x): at least half the weight bytes less. A behaviour
    check with a generous margin, not a timing test."""
    rise, weight_bytes = phase_peaks(tmp_path, "outliers=0.01,criterion=gradient", "gradients")
    assert rise["auto"] + weight_bytes / 2 < rise["off"], (rise, weight_bytes)
    assert rise["auto"] < 1.5 * weight_bytes, (rise, weight_bytes)
