"""int8 ops between the int8 layers (lowering/int8_elementwise.py, gr_int8_elementwise.c):
fan-out adds, the squeeze-excitation gate (sigmoid, broadcast multiply), average
pooling, table activations, concat and constant pad run as integer kernels, bit-exact
against the integer reference and within a few quantization steps of the fake-quant
graph; `check` lists what stays fp32 and why; the fp32 pad kernel."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradrewrite.backends.mcu.check import fp32_ops
from gradrewrite.backends.mcu.inference.lowering import lower
from gradrewrite.backends.mcu.inference.lowering import int8_elementwise as ie
from gradrewrite.backends.mcu.inference.reference import integer_reference
from gradrewrite.rewrite import int8_layers as int8
from gradrewrite.rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL

from tests.backends.test_mcu_codegen_int8 import _dq, _int8_weight, _q
from tests.backends.test_mcu_firmware import need_tools
from tests.cli.conftest import run_cli

from .mcu_helpers import build_and_run, graph_of


class OpNet(nn.Module):
    """Two int8 1x1 convs (a, b: C channels, different scales) and then the ops of one
    case, each result quantized and returned, so every output value is one op's."""

    def __init__(self, case: str, c: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        for name in ("w1", "w2"):
            wq, ws, wz = _int8_weight(torch.randn(c, 3, 1, 1, generator=g) * 0.5)
            self.register_buffer(name + "_q", wq)
            self.register_buffer(name + "_s", ws)
            self.register_buffer(name + "_z", wz)
        self.case = case

    def conv(self, x, name, s, z):
        w = DEQUANTIZE_PER_CHANNEL(getattr(self, name + "_q"), getattr(self, name + "_s"),
                                   getattr(self, name + "_z"), 0, -127, 127, torch.int8)
        return _dq(_q(F.conv2d(x, w), s, z), s, z)

    def forward(self, x):
        x = _dq(_q(x, 0.03, 3), 0.03, 3)
        a, b = self.conv(x, "w1", 0.02, -7), self.conv(x, "w2", 0.035, 11)
        out = lambda t, s, z: _dq(_q(t, s, z), s, z)  # noqa: E731
        if self.case == "add":        # s feeds the quantize and the next add: fan-out
            s = a + b
            return out(s, 0.04, 2), out(s + a, 0.05, -3)
        if self.case == "se":         # x * sigmoid(mean(x)): no quantize on the gate
            gate = torch.sigmoid(b.mean((2, 3), keepdim=True))
            return out(a * gate, 0.015, -1), out(a * b, 0.03, 9)
        if self.case == "act":
            return (out(F.hardswish(a), 0.02, -60), out(F.hardsigmoid(b), 1 / 255, -128),
                    out(torch.sigmoid(a), 0.004, -128))
        if self.case == "pool":
            return (out(F.avg_pool2d(a, 3, 2, 1, ceil_mode=True, count_include_pad=False), 0.01, -4),
                    out(F.avg_pool2d(b, 2, 1, 1), 0.02, 6),
                    out(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1), 0.005, 3))
        if self.case == "cat":
            return (out(torch.cat([a, b, a], 1), 0.035, 11),)
        if self.case == "pad":        # one side only; rescaled; a non-zero constant
            return out(F.pad(a, (0, 1, 2, 0)), 0.02, -7), out(F.pad(b, (1, 1, 1, 1), value=0.5), 0.03, 0)
        raise ValueError(self.case)


CASES = {"add": {"gr_add_lut_s8"}, "se": {"gr_avg_pool2d_s8", "gr_lut_s8", "gr_mul_s8"},
         "act": {"gr_lut_s8"}, "pool": {"gr_avg_pool2d_s8"}, "cat": {"gr_concat_s8"}, "pad": {"gr_pad_s8"}}


@pytest.mark.parametrize("hw", [(7, 6), (1, 1)], ids=["7x6", "1x1"])
@pytest.mark.parametrize("case", list(CASES))
def test_int8_op_is_bit_exact_against_the_integer_reference(case, hw, tmp_path):
    net = OpNet(case)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(4)) * 2
    graph = graph_of(net, x)
    prog = lower(graph)
    kernels = {s.kernel for s in prog.steps}
    assert CASES[case] <= kernels, kernels
    # nothing between the layers runs fp32: only the outputs are dequantized
    assert {k for k in kernels if not k.endswith("_s8")} <= {"gr_dequantize_i8_f32"}, kernels
    got, _ = build_and_run(graph, tmp_path, x)
    ref = integer_reference(graph, x)
    fake = graph(x)
    for g, r, f, (s, _z) in zip(got, ref, fake, _out_scales(graph)):
        assert torch.equal(g, r), (g - r).abs().max()
        # TFLite semantics read quantized inputs: a few output steps from the fake-quant graph
        assert (g - f).abs().max() <= 4 * s + 1e-6, ((g - f).abs().max(), s)


def _out_scales(graph):
    out = next(n for n in graph.gm.graph.nodes if n.op == "output")
    return [(float(n.args[1]), int(n.args[2])) for n in out.args[0]]


class Mixed(OpNet):
    def forward(self, x):
        x = _dq(_q(x, 0.03, 3), 0.03, 3)
        a = self.conv(x, "w1", 0.02, -7)
        h = F.hardswish(a)                       # read by an fp32 softmax: stays fp32
        return torch.softmax(h, -1), _dq(_q(F.pad(x, (1, 0, 0, 0)) * 2, 0.1, 0), 0.1, 0)


def make_mixed():
    return Mixed("x").eval(), (torch.randn(1, 3, 4, 4),)


def test_plan_keeps_ops_fp32_with_a_reason():
    model, example = make_mixed()
    graph = graph_of(model, *example)
    plan = ie.plan(graph, int8.find(graph))
    reasons = {n.name: r for n, r in plan.fp32.items()}
    assert "softmax" in reasons["hardswish"] and "fp32" in reasons["hardswish"]
    assert "mul" in reasons["pad"]              # its reader multiplies by a constant
    listed = {p.op: p.reason for p in fp32_ops(graph)}
    assert set(listed) == {"aten.hardswish", "aten.softmax.int", "aten.pad", "aten.mul.Tensor"}, listed
    assert all(listed.values())
    assert "constant operand" in listed["aten.mul.Tensor"]
    assert fp32_ops(graph_of(nn.Conv2d(3, 4, 1), torch.randn(1, 3, 4, 4))) == []   # float graph


class InputPad(OpNet):
    def forward(self, x):
        x = F.pad(x, (0, 1, 2, 0), value=self.value)
        return (self.conv(_dq(_q(x, 0.03, 3), 0.03, 3), "w1", 0.02, -7),)


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_zero_pad_of_the_input_pads_the_int8_input(value, tmp_path):
    """quantize(pad(x, 0)) == pad(quantize(x), zero point): the caller's int8 input is
    padded; another constant keeps the float input, an fp32 pad and a quantize."""
    net = InputPad("x")
    net.value = value
    x = torch.randn(1, 3, 5, 4, generator=torch.Generator().manual_seed(2))
    graph = graph_of(net, x)
    prog = lower(graph)
    kernels = [s.kernel for s in prog.steps]
    if value == 0.0:
        assert kernels[0] == "gr_pad_s8" and prog.inputs[0].dtype == "i8", kernels
    else:
        assert kernels[:2] == ["gr_pad_f32", "gr_quantize_f32_i8"] and prog.inputs[0].dtype == "f32", kernels
    (got,), _ = build_and_run(graph, tmp_path, x)
    assert torch.equal(got, integer_reference(graph, x)[0])


def test_fp32_pad_matches_torch(tmp_path):
    class Pad(nn.Module):
        def forward(self, x):
            return F.pad(x, (0, 2, 1, 0), value=-1.5), F.pad(x, (1, 1, 1, 1))

    x = torch.randn(2, 3, 5, 1)
    graph = graph_of(Pad(), x)
    assert {s.kernel for s in lower(graph).steps} == {"gr_pad_f32"}
    got, _ = build_and_run(graph, tmp_path, x)
    for g, r in zip(got, Pad()(x)):
        assert torch.equal(g, r)


def test_bad_pad_is_a_one_line_error():
    class Crop(nn.Module):
        def forward(self, x):
            return F.pad(x, (-1, 0, 0, 0))

    graph = graph_of(Crop(), torch.randn(1, 2, 3, 3))
    with pytest.raises(Exception, match="negative padding") as info:
        lower(graph)
    assert "\n" not in str(info.value)


class SENet(nn.Module):
    """Hand-written: "same" padding by F.pad (input and mid-network, one side), hardswish,
    residual adds with fan-out, a squeeze-excitation block, concat, average pools."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 2)
        self.b1 = nn.Conv2d(c, c, 1)
        self.b2 = nn.Conv2d(c, c, 1)
        self.se1 = nn.Conv2d(c, 4, 1)
        self.se2 = nn.Conv2d(4, c, 1)
        self.br = nn.Conv2d(c, 5, 3, 2)
        self.head = nn.Conv2d(c + 5, 13, 1)
        self.fc = nn.Linear(13, 7)

    def forward(self, x):
        x = F.hardswish(self.stem(F.pad(x, (0, 1, 0, 1))))
        x = x + self.b1(x)
        x = x + self.b2(x)
        s = torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(x, 1)))))
        x = x * s
        y = F.hardsigmoid(self.br(F.pad(x, (1, 1, 1, 1))))
        x = torch.cat([F.avg_pool2d(x, 2), y], 1)
        x = F.avg_pool2d(self.head(x), 2, 1)
        return self.fc(x.mean((2, 3)))


def make_senet():
    torch.manual_seed(0)
    return SENet().eval(), (torch.randn(1, 3, 16, 16),)


@pytest.mark.slow
def test_se_net_cli_cortex_m4_bit_exact_and_check(tmp_path):
    """`gradrewrite compile` (quantize, mcu, cortex-m4: host check + QEMU run), `run --compare`
    under QEMU, and `check` on the quantized graph listing what stays fp32."""
    need_tools("cortex-m4")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((4, 1, 3, 16, 16)).astype(np.float32))
    root = os.getcwd()
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = root + (os.pathsep + old if old else "")
    try:
        out = tmp_path / "out"
        run_cli("compile", "--module", "tests.backends.test_mcu_int8_elementwise:make_senet",
                "-p", "quantize(mode=static)", "--calib", calib, "--backend", "mcu", "--target", "cortex-m4",
                "-o", out, "-q", check=True)
        facts = json.loads((out / "mcu" / "model.json").read_text())
        kernels = [op["kernel"] for op in facts["ops"]]
        assert {"gr_add_lut_s8", "gr_mul_s8", "gr_lut_s8", "gr_avg_pool2d_s8", "gr_concat_s8",
                "gr_pad_s8"} <= set(kernels), kernels
        assert facts["int8_check"]["bit_exact_expected"] and facts["int8_check"]["bit_exact"]
        # int8 from the input (zero-padded with its zero point) to the dequantized logits
        assert [k for k in kernels if not k.endswith("_s8")] == ["gr_dequantize_i8_f32"], kernels
        assert kernels[0] == "gr_pad_s8" and facts["inputs"][0]["dtype"] == "int8"
        x = tmp_path / "x.npy"
        np.save(x, np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32))
        proc = run_cli("run", out, "--input", x, "--compare", "-o", tmp_path / "y.npz", check=True)
        assert "compare: ok (int8, bit-exact against the integer reference" in proc.stdout
        chk = run_cli("check", out / "mcu" / "reference.pt2", "--target", "cortex-m4", check=True)
        mixed = run_cli("check", "--module", "tests.backends.test_mcu_int8_elementwise:make_mixed", check=True)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    assert "stays fp32" not in chk.stdout and "can be generated" in chk.stdout
    fp32 = [l for l in mixed.stdout.splitlines() if l.startswith("stays fp32:")]
    assert fp32 == ["stays fp32: aten.hardswish at <root>: its result is read by aten.softmax.int, which runs fp32",
                    "stays fp32: aten.softmax.int at <root>: no int8 kernel for this op",
                    "stays fp32: aten.pad at <root>: its result is read by aten.mul.Tensor, which runs fp32",
                    "stays fp32: aten.mul.Tensor at <root>: a constant operand"], mixed.stdout
