"""Done-when check: the example models and transformers models compile with both
backends, with verification at fp32 rounding level."""
from __future__ import annotations

import pytest

import gradrewrite as gr
from examples import models as examples
from tests import model_zoo

MODELS = {
    "small_cnn": examples.small_cnn,
    "mobilenet_v2": examples.mobilenet_v2,
    "tiny_gpt": examples.tiny_gpt,
    **{name: fn for name, fn in model_zoo.ZOO.items()},
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "ort"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_compiles(tmp_path, name, backend):
    model, inputs = MODELS[name]()
    graph = gr.capture(model, inputs, source=name)
    n_bn = graph.op_histogram().get("aten.batch_norm", 0)
    art = gr.compile(graph, tmp_path / "out", passes="fold-bn,dce", backend=backend, latency_runs=0)
    rep = art.report
    folded = rep["passes"][0]["report"]["folded"]
    assert folded == n_bn                 # every BN in these models follows a conv
    v = rep["verification"]
    # fp32 rounding level: relative L2 error of a few ulps over the whole output
    assert v["relative_error"] < 2e-6, v
    assert v["max_abs_error"] < 1e-5 * (1 + v["max_abs_reference"]), v
    out = art(*inputs)
    assert len(out) == len(graph(*inputs))
