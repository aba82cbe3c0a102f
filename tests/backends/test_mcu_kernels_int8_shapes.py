"""mcu int8 kernels at odd shapes: gr_pointwise_s8, gr_pointwise_nm_s8 (2:4 and 1:8),
gr_depthwise3x3_s8, gr_pw_dw_s8 (dense and N:M expand convs; passes of several expanded
planes, a last partial one) and gr_fc_s8 bit-exact against the integer reference, on the host build and under QEMU on
Cortex-M4 and Cortex-M7 (whose DSP paths differ from the host's portable C).

Each model is a chain of hand-quantized layers (the QDQ form the quantize pass writes)
whose shapes hit the kernels' edges: 1x1 maps, channel counts that are not multiples of 4,
pixel counts that leave a partial block of four, stride 2, padding on one side only,
output columns that leave a partial group, a k % 4 tail, two-row inputs. The per-channel
requantization scales span both requantization paths (total shift >= 32 on the fast path,
including exactly 32; below 32 on the generic one)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradrewrite.backends.mcu.firmware import build as firmware, qemu
from gradrewrite.backends.mcu.inference.codegen import write_project
from gradrewrite.backends.mcu.inference.lowering import lower
from gradrewrite.backends.mcu.packing import pack_inputs
from gradrewrite.rewrite import int8_layers as int8
from gradrewrite.rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_TENSOR

from .mcu_helpers import build_and_run, graph_of
from .test_mcu_firmware import CORTEX, need_tools

I8 = torch.int8
# requantization multipliers per output channel, cycled: below 0.25 (total shift >= 33),
# in [0.25, 0.5) (exactly 32), and >= 0.5 (below 32: the generic path)
REALS = (0.004, 0.3, 0.7, 0.02, 1.3, 0.0009, 0.45)


class Chain(nn.Module):
    """x -> quantize -> (layer -> [relu6] -> quantize)*: each layer's int8 weights are
    random, its per-channel weight scales chosen so that input scale * weight scale /
    output scale runs through REALS."""

    def __init__(self, layers: list[dict], seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.specs = layers
        s_in, self.s0, self.z0 = 0.05, 0.05, 3
        for i, spec in enumerate(layers):
            shape = spec["weight"]
            s_out = spec.get("s_out", 0.04)
            reals = torch.tensor([REALS[(c + i) % len(REALS)] for c in range(shape[0])], dtype=torch.float64)
            # weights small where the multiplier is large, so that outputs rarely saturate
            fan_in = int(np.prod(shape[1:]))
            amp = (0.8 / (reals * fan_in ** 0.5)).clamp(1, 127).round().to(torch.int32)
            wq = torch.randint(-127, 128, shape, generator=g, dtype=torch.int32)
            wq = (wq * amp.reshape(-1, *[1] * (len(shape) - 1)) // 127).to(I8)
            if "nm" in spec:  # keep the n largest of every m input channels (1x1 weights)
                n, m = spec["nm"]
                pad = (-shape[1]) % m
                grp = F.pad(wq.reshape(shape[0], -1).int(), (0, pad)).reshape(shape[0], -1, m)
                keep = torch.zeros_like(grp, dtype=torch.bool).scatter_(-1, grp.abs().topk(n, -1).indices, True)
                wq = (wq * keep.reshape(shape[0], -1)[:, :shape[1]].reshape(shape)).to(I8)
            self.register_buffer(f"w{i}", wq)
            self.register_buffer(f"ws{i}", (reals * s_out / s_in).float())
            self.register_buffer(f"wz{i}", torch.zeros(shape[0], dtype=torch.int64))
            self.register_buffer(f"b{i}", torch.randn(shape[0], generator=g) * 0.5)
            s_in = s_out

    def forward(self, x):
        s, z = self.s0, self.z0
        x = DEQUANTIZE_PER_TENSOR(QUANTIZE_PER_TENSOR(x, s, z, -128, 127, I8), s, z, -128, 127, I8)
        for i, spec in enumerate(self.specs):
            w = DEQUANTIZE_PER_CHANNEL(getattr(self, f"w{i}"), getattr(self, f"ws{i}"), getattr(self, f"wz{i}"),
                                       0, -127, 127, I8)
            if spec["kind"] == "linear":
                x = F.linear(x, w, getattr(self, f"b{i}"))
            else:
                x = F.conv2d(x, w, getattr(self, f"b{i}"), spec.get("stride", 1), spec.get("padding", 0),
                             1, spec.get("groups", 1))
            if spec.get("relu6"):
                x = F.hardtanh(x, 0.0, 6.0)
            s, z = spec.get("s_out", 0.04), spec.get("z_out", -5)
            x = DEQUANTIZE_PER_TENSOR(QUANTIZE_PER_TENSOR(x, s, z, -128, 127, I8), s, z, -128, 127, I8)
        return x


def _pw(cin, cout, stride=1, **kw):
    return {"kind": "conv", "weight": (cout, cin, 1, 1), "stride": stride, **kw}


def _dw(c, stride=1, padding=1, **kw):
    return {"kind": "conv", "weight": (c, 1, 3, 3), "stride": stride, "padding": padding, "groups": c, **kw}


def _fc(k, n, **kw):
    return {"kind": "linear", "weight": (n, k), **kw}


CASES = {
    # 42 pixels (a last block of two), 5 and 7 channels; a strided 1x1 (gathered pixels)
    "pointwise": ((1, 5, 7, 6), [_pw(5, 7, relu6=True), _pw(7, 3, stride=2, z_out=7), _pw(3, 9)],
                  {"gr_pointwise_s8": 3}),
    # one pixel: a block of four with three absent pixels; batch of two
    "pointwise 1x1 map": ((2, 6, 1, 1), [_pw(6, 5), _pw(5, 11, relu6=True)], {"gr_pointwise_s8": 2}),
    # stride 1 (odd width: a pair run plus a single output), stride 2 padded on rows only,
    # stride 2 on an even size (the last window ends at the input's edge: padded on one side),
    # padded on columns only
    "depthwise": ((1, 6, 9, 7), [_dw(6, relu6=True), _dw(6, 2, (1, 0)), _dw(6, 2, 1, z_out=9), _dw(6, 1, (0, 1))],
                  {"gr_depthwise3x3_s8": 4}),
    # a 1x1 map: every tap but the centre is padding; two images
    "depthwise 1x1 map": ((2, 3, 1, 1), [_dw(3, relu6=True), _dw(3, 2)], {"gr_depthwise3x3_s8": 2}),
    # an expand conv streamed into the depthwise after it (gr_pw_dw_s8: one expanded plane at
    # a time through the same padded-plane depthwise path), stride 2 on an odd size
    "expand + depthwise": ((1, 5, 7, 9), [_pw(5, 10, relu6=True), _dw(10, 2, z_out=4)], {"gr_pw_dw_s8": 1}),
    # three planes per pass (7 channels: a last pass of one), 15 pixels (a partial block)
    "expand + depthwise, partial pass": ((1, 6, 5, 3), [_pw(6, 7, relu6=True), _dw(7, 1, (1, 0))],
                                         {"gr_pw_dw_s8": 1}),
    # a 1x1 map, two images, five planes per pass then one
    "expand + depthwise 1x1 map": ((2, 5, 1, 1), [_pw(5, 6, relu6=True), _dw(6, z_out=4)], {"gr_pw_dw_s8": 1}),
    # N:M pointwise (gr_pointwise_nm_s8): 2:4 pairs over 7 channels (a last group of three)
    # and 18 (five groups: a block of four and one), 35 pixels (a partial block); a strided
    # 2:4 1x1 with 8 output channels runs dense (cheaper than the pairs' gather)
    "pointwise 2:4": ((1, 7, 5, 7), [_pw(7, 18, nm=(2, 4), relu6=True), _pw(18, 16, nm=(2, 4)),
                                     _pw(16, 8, stride=2, nm=(2, 4))],
                      {"gr_pointwise_nm_s8": 2, "gr_pointwise_s8": 1}),
    # 1:8 over 13 and 40 channels (partial groups; rows of two and five kept weights), nine
    # pixels and two images, a strided 1x1
    "pointwise 1:8": ((2, 13, 3, 3), [_pw(13, 40, nm=(1, 8), relu6=True), _pw(40, 11, stride=2, nm=(1, 8))],
                      {"gr_pointwise_nm_s8": 2}),
    # N:M expand convs streamed into their depthwise conv
    "expand 2:4 + depthwise": ((1, 10, 6, 5), [_pw(10, 16, nm=(2, 4), relu6=True), _dw(16, 2, z_out=4)],
                               {"gr_pw_dw_s8": 1}),
    "expand 1:8 + depthwise 1x1 map": ((2, 16, 1, 1), [_pw(16, 10, nm=(1, 8), relu6=True), _dw(10, z_out=4)],
                                       {"gr_pw_dw_s8": 1}),
    # k % 4 tails, column groups of 4 + 3 (a zero column), 4 + 1 (a group of two), 2; one row
    "fully connected": ((1, 13), [_fc(13, 7), _fc(7, 5, relu6=True), _fc(5, 2), _fc(2, 6)], {"gr_fc_s8": 4}),
    # two rows
    "fully connected 2 rows": ((2, 9), [_fc(9, 6), _fc(6, 3)], {"gr_fc_s8": 2}),
}


def _model(name):
    shape, layers, kernels = CASES[name]
    net = Chain(layers, seed=len(name))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(11)) * 2
    return graph_of(net, x), x, kernels


def _check_paths(graph):
    """The layers' channels exercise all three requantization cases."""
    totals = np.concatenate([31 - q.shift for q in int8.find(graph).values() if q.kind != "add"])
    assert (totals > 32).any() and (totals == 32).any() and (totals < 32).any(), totals


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_bit_exact_on_the_host(name, tmp_path):
    graph, x, kernels = _model(name)
    _check_paths(graph)
    prog = lower(graph)
    steps = [s.kernel for s in prog.steps]
    assert {k: steps.count(k) for k in kernels} == kernels, steps
    assert (prog.notes["nm_layers"] > 0) == (":" in name)   # N:M cases run packed weights
    (got,), _ = build_and_run(graph, tmp_path, x)
    ref = int8.integer_reference(graph, x)[0]
    assert torch.equal(got, ref), (got - ref).abs().max()
    # not trivially saturated: the outputs take many int8 values
    assert len(torch.unique(got)) > min(8, got.numel() // 2)


@pytest.mark.parametrize("target", CORTEX)
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_bit_exact_under_qemu(name, target, tmp_path):
    need_tools(target)
    graph, x, kernels = _model(name)
    prog = lower(graph)
    project = tmp_path / "mcu"
    facts = write_project(prog, project, source="test")
    fw = firmware.build_firmware(project, target)
    raw, _ = qemu.run_firmware(fw.elf, pack_inputs([x.numpy()], facts["inputs"]), target)
    spec = facts["outputs"][0]
    got = np.frombuffer(raw, dtype=np.float32, count=int(np.prod(spec["shape"]))).reshape(spec["shape"])
    ref = int8.integer_reference(graph, x)[0].numpy()
    assert np.array_equal(got, ref), np.abs(got - ref).max()
