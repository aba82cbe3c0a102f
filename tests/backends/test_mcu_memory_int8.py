"""mcu int8 inference memory: in-place depthwise convs and the streamed pointwise-expand +
depthwise fusion shrink the arena and stay bit-exact against the integer reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.models import mobilenet_v2
from gradrewrite.rewrite import int8_layers as int8
from gradrewrite.backends.mcu.inference.codegen import plan_arena
from gradrewrite.backends.mcu.inference.lowering import Lowerer, lower
from gradrewrite.compiler import CompileOptions, compile_graph
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_TENSOR

from .mcu_helpers import build_and_run, graph_of

I8 = torch.int8


def _qdq(x, s, z):
    return DEQUANTIZE_PER_TENSOR(QUANTIZE_PER_TENSOR(x, s, z, -128, 127, I8), s, z, -128, 127, I8)


class Block(nn.Module):
    """An int8 QDQ inverted-residual block as the quantize pass writes it: 1x1 expand +
    relu6 (``expand=False``: a 3x3 conv instead, which is not streamed), depthwise 3x3 +
    relu6 (stride 1 or 2), 1x1 project; optionally a residual add that reads the depthwise
    input again, or a second reader of the expanded tensor (a model output)."""

    def __init__(self, cin=4, mid=12, cout=4, stride=1, expand=True, residual=False, reuse_mid=False):
        super().__init__()
        self.stride, self.expand, self.residual, self.reuse_mid = stride, expand, residual, reuse_mid
        g = torch.Generator().manual_seed(stride + 2 * expand + 4 * residual + 8 * reuse_mid)
        shapes = {"pw": (mid, cin, 1, 1) if expand else (mid, cin, 3, 3), "dw": (mid, 1, 3, 3),
                  "pj": (cout, mid, 1, 1)}
        for name, shape in shapes.items():
            w = torch.randn(shape, generator=g) * 0.4
            scale = w.abs().flatten(1).amax(1) / 127
            self.register_buffer(f"{name}_q", torch.round(w / scale.reshape(-1, 1, 1, 1)).to(I8))
            self.register_buffer(f"{name}_s", scale.float())
            self.register_buffer(f"{name}_z", torch.zeros(shape[0], dtype=torch.int64))
            self.register_buffer(f"{name}_b", torch.randn(shape[0], generator=g) * 0.2)
        self.q = [(0.05, 3), (0.04, -128), (0.05, -128), (0.07, 1), (0.08, -2)]

    def w(self, name):
        return DEQUANTIZE_PER_CHANNEL(getattr(self, f"{name}_q"), getattr(self, f"{name}_s"),
                                      getattr(self, f"{name}_z"), 0, -127, 127, I8)

    def forward(self, x):
        (s0, z0), (s1, z1), (s2, z2), (s3, z3), (s4, z4) = self.q
        x = _qdq(x, s0, z0)
        h = _qdq(F.hardtanh(F.conv2d(x, self.w("pw"), self.pw_b, 1, 0 if self.expand else 1), 0.0, 6.0), s1, z1)
        d = _qdq(F.hardtanh(F.conv2d(h, self.w("dw"), self.dw_b, self.stride, 1, 1, h.shape[1]), 0.0, 6.0), s2, z2)
        y = _qdq(F.conv2d(d, self.w("pj"), self.pj_b), s3, z3)
        if self.residual:
            y = _qdq(y + h, s4, z4)
        if self.reuse_mid:
            return y, h
        return y


def _kernels(graph, **kw):
    return [s.kernel for s in Lowerer(graph, quantized_inputs=True, **kw).run().steps]


def _arena(graph, **kw) -> int:
    return plan_arena(Lowerer(graph, quantized_inputs=True, **kw).run()).plan.arena_bytes


def _bit_exact(graph, tmp_path, x):
    got, facts = build_and_run(graph, tmp_path, x)
    ref = int8.integer_reference(graph, x)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert torch.equal(g, r), (g.int() - r.int()).abs().max()
    return facts


@pytest.mark.parametrize("stride,size,batch", [(1, 9, 1), (2, 9, 1), (2, 10, 2), (1, 6, 2)])
def test_streamed_expand_depthwise_is_bit_exact_and_smaller(stride, size, batch, tmp_path):
    """Odd and even sizes (pointwise rows of 4 plus a tail, border taps of the depthwise)."""
    graph = graph_of(Block(stride=stride), torch.randn(batch, 4, size, size))
    kernels = _kernels(graph)
    assert kernels.count("gr_pw_dw_s8") == 1 and kernels.count("gr_pointwise_s8") == 1, kernels  # + project
    assert _kernels(graph, stream=False) == ["gr_pointwise_s8", "gr_depthwise3x3_s8", "gr_pointwise_s8",
                                             "gr_dequantize_i8_f32"]
    assert _arena(graph) < _arena(graph, stream=False)
    x = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(1)) * 2
    _bit_exact(graph, tmp_path, x)


def test_expanded_tensor_read_twice_is_not_streamed(tmp_path):
    graph = graph_of(Block(reuse_mid=True), torch.randn(1, 4, 8, 8))
    kernels = _kernels(graph)
    assert "gr_pw_dw_s8" not in kernels
    # its other reader (the output's dequantize) runs before the depthwise, which may then
    # write over it: the returned expanded tensor must still be right
    assert kernels == ["gr_pointwise_s8", "gr_dequantize_i8_f32", "gr_depthwise3x3_s8", "gr_pointwise_s8",
                       "gr_dequantize_i8_f32"]
    _bit_exact(graph, tmp_path, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("stride,batch", [(1, 1), (2, 1), (2, 2)])
def test_depthwise_writes_over_its_dying_input(stride, batch, tmp_path):
    graph = graph_of(Block(cin=2, mid=16, cout=2, expand=False, stride=stride), torch.randn(batch, 2, 11, 11))
    prog = lower(graph)
    dw = next(s for s in prog.steps if s.kernel == "gr_depthwise3x3_s8")
    assert dw.op.endswith(" in place")
    plan = plan_arena(prog).plan
    x_buf, y_buf, pad = dw.reads[0], dw.writes[0], dw.writes[1]
    assert y_buf.inplace_of is x_buf and plan.offsets[y_buf.name] == plan.offsets[x_buf.name]
    # the zero-point-padded input plane the kernel reads: 13 x 13 (stride 2: 13 x 13 too) + 4
    assert pad.nbytes == 13 * 13 + 4
    assert plan.arena_bytes < _arena(graph, stream=False)
    _bit_exact(graph, tmp_path, torch.randn(batch, 2, 11, 11, generator=torch.Generator().manual_seed(3)) * 2)


def test_depthwise_input_read_later_is_not_overwritten(tmp_path):
    """The residual add reads the depthwise input again: the depthwise writes elsewhere."""
    graph = graph_of(Block(mid=4, expand=False, residual=True), torch.randn(1, 4, 7, 7))
    assert not any(s.op.endswith(" in place") for s in lower(graph).steps)
    _bit_exact(graph, tmp_path, torch.randn(1, 4, 7, 7, generator=torch.Generator().manual_seed(4)))


@pytest.mark.slow
def test_mobilenet_v2_int8_arena_shrinks_and_stays_bit_exact(tmp_path):
    """The quantize pass's MobileNetV2: every expand + depthwise pair streamed, the t=1
    block's depthwise in place; compile's own check is bit-exact against the reference."""
    model, x = mobilenet_v2(0.35, 32, num_classes=10)
    gen = torch.Generator().manual_seed(5)
    calib = [(torch.randn(1, 3, 32, 32, generator=gen),) for _ in range(2)]
    opts = CompileOptions(passes="fold-bn,quantize(mode=static)", backend="mcu", latency_runs=0,
                          verify_inputs=1, calibration=calib, backend_options={"target": "host"})
    art = compile_graph(capture(model, x), tmp_path / "out", opts)
    facts = art.report["mcu"]
    assert facts["int8_check"]["bit_exact_expected"] and facts["int8_check"]["bit_exact"]
    kernels = [op["kernel"] for op in facts["ops"]]
    assert kernels.count("gr_pw_dw_s8") == 16
    assert sum(op["op"].endswith(" in place") for op in facts["ops"]) == 1
    assert facts["arena_bytes"] == facts["lower_bound_bytes"]
    # the largest expanded tensor (block 2: 48 x 16 x 16 int8) is never stored
    assert facts["arena_bytes"] < 48 * 16 * 16
