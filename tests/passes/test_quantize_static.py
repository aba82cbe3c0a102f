"""quantize(mode=static): QDQ placement, int8 weights, observers, numerics vs fake-quant."""
from __future__ import annotations

import pytest
import torch

from examples.models import small_cnn
from gradrewrite.compiler import run_pipeline
from gradrewrite.errors import GradrewriteError, InputError
from gradrewrite.passes.quantize.int8_static import quantize_weight
from gradrewrite.passes.quantize.observers import MSE, MinMax, Percentile, fake_quant, qparams
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.graph import module_path, op_name
from gradrewrite.rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_TENSOR
from gradrewrite.rewrite.registry import PassContext


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = self.conv2(y) + y                      # residual: conv2's output is not ReLU'd
        return self.head(y.mean((2, 3)))


def _calib(n=8, shape=(1, 3, 16, 16)):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(shape, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def quantized():
    graph = capture(Net().eval(), (torch.randn(1, 3, 16, 16),))
    q = graph.clone()
    res = run_pipeline(q, "quantize", ctx=PassContext(calibration=_calib()))
    return graph, q, res.records[-1]


def test_qdq_structure(quantized):
    _, q, record = quantized
    hist = q.op_histogram()
    assert hist["quantized_decomposed.dequantize_per_channel"] == 3
    # inputs: x, relu(conv) (shared by conv2 and the residual), mean -> head; outputs: 3 layers
    assert hist["quantized_decomposed.quantize_per_tensor"] == hist["quantized_decomposed.dequantize_per_tensor"]
    for layer in (n for n in q.call_nodes() if op_name(n) in ("aten.conv2d", "aten.linear")):
        x, w = layer.args[0], layer.args[1]
        assert x.target == DEQUANTIZE_PER_TENSOR and x.args[0].target == QUANTIZE_PER_TENSOR
        assert w.target == DEQUANTIZE_PER_CHANNEL
        assert tuple(w.args[3:]) == (0, -127, 127, torch.int8)
        assert q.attr(w.args[0]).dtype == torch.int8 and str(w.args[0].target).endswith("weight_int8")
        assert str(w.args[1].target).endswith("weight_scale") and q.attr(w.args[1]).dtype == torch.float32
        assert q.attr(w.args[2]).dtype == torch.int64 and not q.attr(w.args[2]).any()
        s, zp = x.args[1], x.args[2]
        assert isinstance(s, float) and isinstance(zp, int) and -128 <= zp <= 127
        assert tuple(x.args[3:6]) == (-128, 127, torch.int8)
        assert layer.args[2].op == "get_attr" and q.attr(layer.args[2]).dtype == torch.float32  # bias
    # conv's output QDQ sits after its ReLU; conv2 (residual, no ReLU) is quantized directly
    conv = next(n for n in q.call_nodes() if module_path(n) == "conv" and op_name(n) == "aten.conv2d")
    relu = next(iter(conv.users))
    assert op_name(relu).startswith("aten.relu") and next(iter(relu.users)).target == QUANTIZE_PER_TENSOR
    conv2 = next(n for n in q.call_nodes() if module_path(n) == "conv2" and op_name(n) == "aten.conv2d")
    assert [u.target for u in conv2.users] == [QUANTIZE_PER_TENSOR]
    assert not any(n.op == "get_attr" and str(n.target) == "conv.weight" for n in q.nodes)
    report = record.report
    assert report["mode"] == "static" and {l["path"] for l in report["layers"]} == {"conv", "conv2", "head"}
    assert {e["path"] for e in report["error_report"]} == {"conv", "conv2", "head"}
    # x, relu(conv) and the mean get input QDQs; conv2 reuses conv's output QDQ
    assert report["rewrites"] == {"input-qdq": 2, "input-reused": 1, "weight-int8": 3, "output-qdq": 3,
                                  "output-float": 0, "add-output-reused": 0}   # the sum feeds only the mean
    assert record.verification is not None      # measured by VerifyEachPass, not failed


class ResidualOf(torch.nn.Module):
    """x = f(conv(x)); x + conv2(x): conv2's output is read by the residual add only."""

    def __init__(self, f):
        super().__init__()
        torch.manual_seed(0)
        self.f = f
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.f(self.conv(x))
        return self.head((x + self.conv2(x)).mean((2, 3)))


@pytest.mark.parametrize("f, floats", [(torch.nn.Hardswish(), 0), (torch.nn.Sigmoid(), 0),
                                       (torch.nn.GroupNorm(2, 8), 1), (torch.nn.GELU(), 2)])
def test_default_outputs_stay_float_only_where_no_reader_takes_int8(f, floats):
    """outputs=auto (the default): a residual add whose other operand is a hardswish /
    sigmoid of a quantized value (the mcu backend runs those int8) keeps conv2's pair; a
    norm's output cannot be int8, so conv2's output stays float; GELU reads conv's output
    in float, so that stays float too. outputs=all quantizes all three."""
    for outputs, expect in (("", floats), (",outputs=all", 0)):
        graph = capture(ResidualOf(f).eval(), (torch.randn(1, 3, 8, 8),))
        res = run_pipeline(graph, f"quantize(mode=static{outputs})", verify=False,
                           ctx=PassContext(calibration=_calib(4, (1, 3, 8, 8))))
        rewrites = res.records[-1].report["rewrites"]
        assert (rewrites["output-float"], rewrites["output-qdq"]) == (expect, 3 - expect), (f, outputs)


def test_int8_graph_matches_fake_quant_reference(quantized):
    """The QDQ graph equals eager PyTorch with every tensor fake-quantized by hand."""
    graph, q, record = quantized
    layers = {l["path"]: l for l in record.report["layers"]}
    m = Net().eval()
    m.load_state_dict({k: graph.attr(k) for k in m.state_dict()})
    fq = lambda t, p: fake_quant(t, layers[p]["input"]["scale"], layers[p]["input"]["zero_point"])
    fo = lambda t, p: fake_quant(t, layers[p]["output"]["scale"], layers[p]["output"]["zero_point"])
    wq = {}
    for name in ("conv", "conv2", "head"):
        w = getattr(m, name).weight
        qw, s = quantize_weight(w)
        wq[name] = qw.float() * s.reshape(-1, *([1] * (w.dim() - 1)))
        assert ((wq[name] - w).abs() <= s.reshape(-1, *([1] * (w.dim() - 1))) / 2 + 1e-7).all()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    y = fo(torch.relu(torch.nn.functional.conv2d(fq(x, "conv"), wq["conv"], m.conv.bias, padding=1)), "conv")
    y2 = fo(torch.nn.functional.conv2d(fq(y, "conv2"), wq["conv2"], m.conv2.bias, padding=1), "conv2")
    ref = fo(torch.nn.functional.linear(fq((y2 + y).mean((2, 3)), "head"), wq["head"], m.head.bias), "head")
    out = q(x)[0]
    step = layers["head"]["output"]["scale"]
    # equal up to fp32 rounding, which can flip a rounding tie: at most one output step
    assert (out - ref).abs().max() <= step * 1.01
    assert (out - ref).abs().le(1e-5).float().mean() >= 0.75


def test_observers():
    x = torch.cat([torch.randn(10000), torch.tensor([50.0])])
    mm, pc, mse = MinMax(), Percentile(99.9), MSE()
    for o in (mm, pc, mse):
        o.update(x)
    assert mm.range()[1] == 50.0
    assert pc.range()[1] < 5.0                      # the single spike is cut
    lo, hi = mse.range()
    assert hi < 50.0
    s, zp = qparams(-1.0, 3.0)
    assert fake_quant(torch.tensor(0.0), s, zp) == 0.0     # zero is exact
    assert abs(s - 4.0 / 255) < 1e-7


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_other_observers_run(observer):
    graph = capture(Net().eval(), (torch.randn(1, 3, 16, 16),))
    res = run_pipeline(graph, f"quantize(observer={observer})", ctx=PassContext(calibration=_calib(3)))
    assert res.records[-1].report["observer"] == observer
    assert graph.op_histogram()["quantized_decomposed.dequantize_per_channel"] == 3


def test_select_exclude_and_skips():
    model, (x,) = small_cnn()
    graph = capture(model, (x,))
    res = run_pipeline(graph, "fold-bn,quantize(exclude=fc)", ctx=PassContext(calibration=_calib(2, x.shape)))
    report = res.records[-1].report
    assert {"path": "fc", "reason": "excluded by 'fc'"} in report["skipped"]
    assert "aten.linear" in graph.op_histogram()
    lin = next(n for n in graph.call_nodes() if op_name(n) == "aten.linear")
    assert lin.args[1].op == "get_attr" and graph.attr(lin.args[1]).dtype == torch.float32


def test_static_needs_calibration():
    graph = capture(Net().eval(), (torch.randn(1, 3, 16, 16),))
    with pytest.raises(InputError, match="needs calibration data"):
        run_pipeline(graph, "quantize")
    assert "quantized_decomposed.quantize_per_tensor" not in graph.op_histogram()


def test_calibration_shape_mismatch_is_an_error():
    graph = capture(Net().eval(), (torch.randn(1, 3, 16, 16),))
    with pytest.raises(GradrewriteError, match="captured with 1x3x16x16"):
        run_pipeline(graph, "quantize", ctx=PassContext(calibration=[(torch.randn(1, 3, 8, 8),)]))


def test_observer_auto_keeps_the_observer_that_moves_the_outputs_least():
    """observer=auto: every observer tried on a copy; the graph gets the argmin's rewrite,
    the same as asking for that observer by name."""
    from gradrewrite.passes.quantize.observer_search import output_change
    from gradrewrite.passes.quantize.observers import OBSERVERS

    calib = _calib(6)
    calib[2] = (calib[2][0] * 6.0,)            # one wide batch: min/max and clipping observers disagree
    graph = capture(Net().eval(), (torch.randn(1, 3, 16, 16),))
    ref = graph.clone()
    res = run_pipeline(graph, "quantize(observer=auto)", ctx=PassContext(calibration=calib))
    report = res.records[-1].report
    search = report["observer_search"]["output_change"]
    assert set(search) == set(OBSERVERS)
    assert len(set(search.values())) > 1      # the candidates differ on this data
    assert report["observer"] == min(OBSERVERS, key=lambda n: (search[n], OBSERVERS.index(n)))
    named = ref.clone()
    run_pipeline(named, f"quantize(observer={report['observer']})", ctx=PassContext(calibration=calib))
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(graph(x)[0], named(x)[0])
    refs = [list(ref(*s)) for s in calib]
    assert output_change(graph, calib, refs) == pytest.approx(search[report["observer"]], rel=1e-4)


def test_observer_auto_is_a_valid_option_and_unknown_ones_are_not():
    graph = capture(Net().eval(), (torch.randn(1, 3, 16, 16),))
    with pytest.raises(GradrewriteError, match="unknown observer 'best'"):
        run_pipeline(graph, "quantize(observer=best)", ctx=PassContext(calibration=_calib(2)))
