"""quantize(mode=static, bias_correction=true): each conv's bias absorbs the mean shift int8
puts on its output -- the first conv's int8 output is unbiased per channel against eager
PyTorch on the calibration data it saw, the model's output moves less from eager on held-out
inputs, and the option is refused outside static int8."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gradrewrite as gr
from gradrewrite.errors import ConfigError
from gradrewrite.passes.quantize.observers import fake_quant
from gradrewrite.rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_PER_TENSOR
from gradrewrite.rewrite.registry import PassContext


class DepthwiseNet(nn.Module):
    """3-channel stem, depthwise + pointwise pairs (the layers whose int8 weights shift
    their outputs most: few weights per channel), pooled linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw1, self.pw1 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1)
        self.dw2, self.pw2 = nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, 10)
        with torch.no_grad():   # trained-like: biases and weights of uneven size
            for conv in (self.stem, self.dw1, self.dw2):
                conv.weight.mul_(torch.linspace(0.2, 3.0, conv.weight.shape[0])[:, None, None, None])

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.pw1(torch.relu(self.dw1(y))))
        y = torch.relu(self.pw2(torch.relu(self.dw2(y))))
        return self.head(y.mean((2, 3)))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand((4, 3, 32, 32), generator=g) * 2 - 0.5,) for _ in range(n)]


def _quantized(model, calib, correction: bool):
    graph = gr.capture(model, calib[0])
    res = gr.run_pipeline(graph, f"quantize(mode=static,bias_correction={str(correction).lower()})",
                          verify=False, ctx=PassContext(seed=0, calibration=calib))
    return graph, res.records[-1].report


def _stem_int8(graph):
    """The stem conv of the quantized graph: its input scale/zero point, int8-dequantized
    weight and stored bias."""
    conv = next(n for n in graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.conv2d.default)
    x_dq, w_dq, b = conv.args[:3]
    q = x_dq.args[0]
    assert q.target == QUANTIZE_PER_TENSOR and w_dq.target == DEQUANTIZE_PER_CHANNEL
    w = graph.attr(w_dq.args[0]).float() * graph.attr(w_dq.args[1])[:, None, None, None]
    return float(q.args[1]), int(q.args[2]), w, graph.attr(b), conv.args[3:]


def test_first_conv_output_unbiased_per_channel_on_the_calibration_data():
    model = DepthwiseNet().eval()
    calib = _data(6, 0)
    plain, _ = _quantized(model, calib, False)
    graph, report = _quantized(model, calib, True)
    assert report["rewrites"]["bias-corrected"] == 5   # every conv (the linear head is left alone)
    recorded = [x for (x,) in calib[:4]]   # the inputs the pass records per layer (ERROR_SAMPLES)

    def mean_shift(g):
        s, zp, w, b, rest = _stem_int8(g)
        with torch.no_grad():
            d = torch.stack([(nn.functional.conv2d(fake_quant(x, s, zp), w, b, *rest)
                              - model.stem(x)).transpose(0, 1).reshape(16, -1).mean(1) for x in recorded])
        return d.mean(0).abs()

    before, after = mean_shift(plain), mean_shift(graph)
    assert float(before.max()) > 1e-3                      # int8 shifts the stem's channels ...
    assert float(after.max()) < 1e-5 < float(before.max()) / 100   # ... and the corrected bias removes it
    assert torch.equal(_stem_int8(graph)[2], _stem_int8(plain)[2])  # same int8 weights and scales


def test_output_closer_to_eager_on_held_out_inputs():
    model = DepthwiseNet().eval()
    calib, held = _data(8, 0), _data(4, 1)
    errs = {}
    for correction in (False, True):
        graph, _ = _quantized(model, calib, correction)
        with torch.no_grad():
            num = sum(float((graph(*s)[0] - model(*s)).pow(2).sum()) for s in held)
            den = sum(float(model(*s).pow(2).sum()) for s in held)
        errs[correction] = (num / den) ** 0.5
    assert 0 < errs[True] < 0.9 * errs[False], errs


def test_bias_correction_refused_outside_static_int8():
    with pytest.raises(ConfigError, match="bias_correction"):
        gr.run_pipeline(gr.capture(nn.Sequential(nn.Linear(32, 8)).eval(), (torch.randn(2, 32),)),
                        "quantize(mode=weight-only,bits=4,group=16,bias_correction=true)", verify=False)
