"""quantize(mode=static): SmoothQuant scale migration, float outputs where only float ops
read them, the accuracy-aware fallback, the entropy observer, option validation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gradrewrite as gr
from gradrewrite.errors import ConfigError
from gradrewrite.passes.quantize import Quantize
from gradrewrite.passes.quantize.layers import find_layers
from gradrewrite.passes.quantize.observers import Entropy, MinMax, fake_quant, qparams
from gradrewrite.passes.quantize.smoothquant import OUTLIER_RATIO, channel_ratio, smooth_linears
from gradrewrite.rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_PER_TENSOR
from gradrewrite.rewrite.registry import PassContext

D = 32


class PreLN(nn.Module):
    """x + fc2(gelu(fc1(norm(x)))): the norm's output feeds fc1 only (1/s folds into the norm);
    fc2 reads a GELU (1/s needs a mul). The norm's weight gives two channels ~30x the rest."""

    def __init__(self, outliers: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(D)
        if outliers:
            with torch.no_grad():
                self.norm.weight[[3, 17]] = 30.0
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 16, D, generator=g),) for _ in range(n)]


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_smoothing_is_exact_before_rounding():
    model = PreLN().eval()
    graph = gr.capture(model, _data(1, 0)[0])
    layers, _ = find_layers(graph, "op:linear|conv", "", kinds=("conv", "linear"), what="quantize")
    report = smooth_linears(graph, layers, _data(4, 1), mode="on", alpha=0.5)
    assert [g["smoothed"] for g in report["groups"]] == [True, True]
    assert report["groups"][0]["folded_into"].startswith("layer_norm")
    assert report["groups"][1]["folded_into"] == "input-mul"
    assert report["groups"][0]["ratio_after"] < report["groups"][0]["ratio_before"]
    for (x,) in _data(3, 2):
        with torch.no_grad():
            ref = model(x)
        got = graph(x)[0]
        # fp32 rounding of the rescaled weights and norm: a few ulps of the output's scale
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_auto_smooths_only_outlier_inputs():
    calib = _data(4, 1)
    for outliers, expect in ((True, True), (False, False)):
        graph = gr.capture(PreLN(outliers).eval(), calib[0])
        res = gr.run_pipeline(graph, "quantize(mode=static)", verify=False, ctx=PassContext(calibration=calib))
        group = res.records[-1].report["smoothquant"]["groups"][0]     # fc1, behind the norm
        assert (group["ratio_before"] >= OUTLIER_RATIO) is outliers
        assert group["smoothed"] is expect


def test_smoothing_cuts_the_int8_output_error():
    model, calib, held = PreLN().eval(), _data(8, 1), _data(4, 3)
    errs = {}
    for smooth in ("off", "auto"):
        graph = gr.capture(model, calib[0])
        gr.run_pipeline(graph, f"quantize(mode=static,outputs=auto,smooth={smooth})", verify=False,
                        ctx=PassContext(calibration=calib))
        with torch.no_grad():
            errs[smooth] = sum(_rel(graph(x)[0], model(x)) for (x,) in held) / len(held)
    assert errs["auto"] < 0.75 * errs["off"]


def test_outputs_read_only_by_float_ops_stay_float():
    """fc1's output goes to GELU (float): no quantize there. fc2's goes to a residual add with
    the graph input, which a quantized first layer may read as int8: kept. outputs=all
    quantizes both (the full chains the mcu/tvm int8 lowerings take)."""
    calib = _data(4, 1)
    for outputs, qdq in (("auto", 1), ("all", 2)):
        graph = gr.capture(PreLN().eval(), calib[0])
        res = gr.run_pipeline(graph, f"quantize(mode=static,outputs={outputs})", verify=False,
                              ctx=PassContext(calibration=calib))
        rewrites = res.records[-1].report["rewrites"]
        assert rewrites["output-qdq"] == qdq and rewrites["output-float"] == 2 - qdq
        # inputs of both layers are still quantized
        assert graph.op_histogram()["quantized_decomposed.quantize_per_tensor"] == 2 + qdq


def test_fallback_keeps_the_worst_layers_float():
    model, calib = PreLN().eval(), _data(4, 1)
    graph = gr.capture(model, calib[0])
    res = gr.run_pipeline(graph.clone(), "quantize(mode=static,smooth=off)", verify=False,
                          ctx=PassContext(calibration=calib))
    errors = {e["path"]: e["relative_error"] for e in res.records[-1].report["error_report"]}
    threshold = (min(errors.values()) + max(errors.values())) / 2
    worst = max(errors, key=errors.get)
    q = graph.clone()
    res = gr.run_pipeline(q, f"quantize(mode=static,smooth=off,max_layer_error={threshold})", verify=False,
                          ctx=PassContext(calibration=calib))
    report = res.records[-1].report
    assert [f["path"] for f in report["fallback"]] == [worst]
    assert report["fallback"][0]["relative_error"] == pytest.approx(errors[worst]) and \
        report["fallback"][0]["threshold"] == threshold
    assert {l["path"] for l in report["layers"]} == set(errors) - {worst}
    float_layer = next(n for n in q.call_nodes() if n.target == torch.ops.aten.linear.default
                       and n.meta.get("nn_module_stack") and worst in str(n.meta["nn_module_stack"])
                       and n.args[1].op == "get_attr")
    assert float_layer.args[1].target != DEQUANTIZE_PER_CHANNEL
    assert sum(1 for n in q.call_nodes() if n.target == DEQUANTIZE_PER_CHANNEL) == len(errors) - 1


def test_entropy_observer():
    relu = torch.relu(torch.randn(200000, generator=torch.Generator().manual_seed(0)))
    e, mm = Entropy(), MinMax()
    for o in (e, mm):
        o.update(relu)
    lo, hi = e.range()
    assert lo == 0.0 and 1.0 < hi < mm.range()[1]          # clips the tail, keeps the bulk
    # clipping the tail that way rounds the bulk finer: less error on the values below hi
    bulk = relu[relu < hi]
    err = lambda r: float(((fake_quant(bulk, *qparams(*r)) - bulk) ** 2).mean())  # noqa: E731
    assert err((lo, hi)) < err(mm.range())
    assert channel_ratio(torch.tensor([1.0, 1.0, 10.0, 0.0])) == 10.0


def test_entropy_observer_runs_in_the_pass():
    calib = _data(3, 1)
    graph = gr.capture(PreLN().eval(), calib[0])
    res = gr.run_pipeline(graph, "quantize(mode=static,observer=entropy)", verify=False,
                          ctx=PassContext(calibration=calib))
    assert res.records[-1].report["observer"] == "entropy"
    assert graph.op_histogram()[str(QUANTIZE_PER_TENSOR).removesuffix(".default")] >= 2


@pytest.mark.parametrize("kwargs, match", [
    ({"smooth": "maybe"}, "smooth"),
    ({"smooth_alpha": 1.5}, "smooth_alpha"),
    ({"smooth_alpha": "best"}, "smooth_alpha"),
    ({"max_layer_error": -0.1}, "max_layer_error"),
    ({"outputs": "some"}, "outputs"),
    ({"observer": "kl"}, "observer"),
    ({"mode": "weight-only", "bits": 4, "smooth": "on"}, "static"),
    ({"mode": "weight-only", "bits": 4, "max_layer_error": 0.1}, "static"),
    ({"mode": "weight-only", "bits": 4, "outputs": "all"}, "static"),
])
def test_static_options_are_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Quantize(**kwargs)
