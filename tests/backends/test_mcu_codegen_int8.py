"""mcu int8 and N:M code generation: bit-exact against the integer reference,
within a quantization step of the fake-quant torch graph; `check` lists all
unsupported ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.models import small_cnn
from gradrewrite.rewrite import int8_layers as int8
from gradrewrite.backends.mcu.check import check_graph
from gradrewrite.backends.mcu.inference.lowering import lower
from gradrewrite.compiler import run_pipeline
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_TENSOR

from ..cli.conftest import run_cli
from .mcu_helpers import build_and_run, graph_of
from .test_mcu_firmware import CORTEX, need_tools

I8 = torch.int8


def _q(x, s, z):
    return QUANTIZE_PER_TENSOR(x, s, z, -128, 127, I8)


def _dq(x, s, z):
    return DEQUANTIZE_PER_TENSOR(x, s, z, -128, 127, I8)


def _int8_weight(w: torch.Tensor, nm: tuple[int, int] | None = None):
    if nm is not None:  # keep the n largest of every m along the input channels
        n, m = nm
        g = w.permute(0, *range(2, w.dim()), 1).reshape(-1, w.shape[1]).reshape(-1, w.shape[1] // m, m)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(n, -1).indices, True)
        keep = keep.reshape(w.shape[0], *w.shape[2:], w.shape[1]).permute(0, w.dim() - 1, *range(1, w.dim() - 1))
        w = w * keep
    scale = w.abs().flatten(1).amax(1).clamp_min(1e-8) / 127
    shape = (-1,) + (1,) * (w.dim() - 1)
    wq = torch.round(w / scale.reshape(shape)).clamp(-127, 127).to(I8)
    return wq, scale.float(), torch.zeros(w.shape[0], dtype=torch.int64)


class QNet(nn.Module):
    """A static int8 QDQ graph as the quantize pass writes it: conv+relu, depthwise
    conv+relu6, a strided conv, a linear head; per-channel int8 weights, fp32 bias."""

    def __init__(self, nm: tuple[int, int] | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        shapes = {"c1": (16, 3, 3, 3), "dw": (16, 1, 3, 3), "c2": (16, 16, 1, 1), "fc": (10, 16 * 4 * 4)}
        for name, shape in shapes.items():
            w = torch.randn(shape, generator=g) * 0.3
            wq, ws, wz = _int8_weight(w, nm if name in ("c2", "fc") else None)
            self.register_buffer(f"{name}_int8", wq)
            self.register_buffer(f"{name}_scale", ws)
            self.register_buffer(f"{name}_zp", wz)
            self.register_buffer(f"{name}_bias", torch.randn(shape[0], generator=g) * 0.1)
        self.act = [(0.05, -3), (0.04, -128), (0.03, -128), (0.06, 5), (0.1, 2)]

    def w(self, name):
        return DEQUANTIZE_PER_CHANNEL(getattr(self, f"{name}_int8"), getattr(self, f"{name}_scale"),
                                      getattr(self, f"{name}_zp"), 0, -127, 127, I8)

    def forward(self, x):
        (s0, z0), (s1, z1), (s2, z2), (s3, z3), (s4, z4) = self.act
        x = _dq(_q(x, s0, z0), s0, z0)
        x = F.relu(F.conv2d(x, self.w("c1"), self.c1_bias, 2, 1))
        x = _dq(_q(x, s1, z1), s1, z1)
        x = F.hardtanh(F.conv2d(x, self.w("dw"), self.dw_bias, 1, 1, 1, 16), 0.0, 6.0)
        x = _dq(_q(x, s2, z2), s2, z2)
        x = F.conv2d(x, self.w("c2"), self.c2_bias, 2)
        x = _dq(_q(x, s3, z3), s3, z3)
        x = F.linear(torch.flatten(x, 1), self.w("fc"), self.fc_bias)
        return _dq(_q(x, s4, z4), s4, z4)


def _check_int8(net: QNet, tmp_path, *, expect_nm: int = 0):
    x = torch.randn(1, 3, 16, 16)
    graph = graph_of(net, x)
    assert len(int8.find(graph)) == 4
    prog = lower(graph)
    kernels = [s.kernel for s in prog.steps]
    assert sum(k.endswith("_s8") for k in kernels) == 4, kernels
    assert prog.notes["nm_layers"] == expect_nm
    fresh = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2
    (got,), _ = build_and_run(graph, tmp_path, fresh)
    ref = int8.integer_reference(graph, fresh)[0]
    assert torch.equal(got, ref), (got - ref).abs().max()
    fake = graph(fresh)[0]
    # integer requantization vs float rounding: at most one step of the output scale
    # per layer boundary (4 layers)
    assert (got - fake).abs().max() <= 4 * net.act[-1][0] + 1e-6


def test_int8_is_bit_exact_against_the_integer_reference(tmp_path):
    _check_int8(QNet(), tmp_path)


class QFloatOutNet(nn.Module):
    """int8 layers whose outputs stay float (quantize's outputs=auto): a strided, padded
    conv whose output goes through a float add (exact in C) before it is quantized for a
    linear head (k = 175: a tail of 3 past the groups of four; 11 columns: a group of 3),
    whose output is the graph's, float. Batch 2."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        for name, shape in {"c1": (7, 3, 3, 3), "fc": (11, 7 * 5 * 5)}.items():
            wq, ws, wz = _int8_weight(torch.randn(shape, generator=g) * 0.3)
            self.register_buffer(f"{name}_int8", wq)
            self.register_buffer(f"{name}_scale", ws)
            self.register_buffer(f"{name}_zp", wz)
            self.register_buffer(f"{name}_bias", torch.randn(shape[0], generator=g) * 0.1)
        self.register_buffer("shift", torch.randn(7, 1, 1, generator=g))
        self.act = [(0.04, -5), (0.05, 7)]

    w = QNet.w

    def forward(self, x):
        (s0, z0), (s1, z1) = self.act
        x = F.conv2d(_dq(_q(x, s0, z0), s0, z0), self.w("c1"), self.c1_bias, 2, 0) + self.shift
        x = _dq(_q(x, s1, z1), s1, z1)
        return F.linear(torch.flatten(x, 1), self.w("fc"), self.fc_bias)


def test_int8_layers_with_float_outputs_are_bit_exact(tmp_path):
    """A conv / linear with int8 input and weights and a float output: the int32
    accumulator times s_x * s_w[c] (gr_conv2d_s8_f32, gr_fc_s8_f32), bit-exact against the
    integer reference; that differs from the fake-quant float layer only by the int32 bias
    rounding (half a step of s_x * s_w[c] per output) and fp32 summation."""
    net = QFloatOutNet().eval()
    x = torch.randn(2, 3, 12, 12)
    graph = graph_of(net, x)
    layers = int8.find(graph, float_outputs=True)
    assert [(ql.kind, ql.float_out) for ql in layers.values()] == [("conv", True), ("linear", True)]
    assert int8.find(graph) == {}   # not requantizing chains: only on request
    prog = lower(graph)
    assert [s.kernel for s in prog.steps if "s8" in s.kernel] == ["gr_conv2d_s8_f32", "gr_fc_s8_f32"]
    fresh = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3)) * 2
    (got,), _ = build_and_run(graph, tmp_path, fresh)
    ref = int8.integer_reference(graph, fresh)[0]
    assert got.dtype == torch.float32 and torch.equal(got, ref), (got - ref).abs().max()
    # each layer on its own int8 input against the float layer on the dequantized values
    s0, z0 = net.act[0]
    xq = QUANTIZE_PER_TENSOR(fresh, s0, z0, -128, 127, I8)
    conv = next(iter(layers.values()))
    y = int8.run_layer(conv, xq)
    fake = F.conv2d(_dq(xq, s0, z0), net.w("c1"), net.c1_bias, 2, 0)
    step = (s0 * net.c1_scale).reshape(1, -1, 1, 1)
    assert ((y - fake).abs() <= 0.5 * step + 1e-5 * fake.abs().max()).all()


@pytest.mark.parametrize("target", CORTEX)
def test_int8_layers_with_float_outputs_bit_exact_under_qemu(target, tmp_path):
    """The float-output kernels on Cortex-M (gr_fc_s8_f32 takes the DSP accumulation path
    there; the FPU's int-to-float conversion and multiply round as the host's)."""
    import numpy as np

    from gradrewrite.backends.mcu.firmware import build as firmware, qemu
    from gradrewrite.backends.mcu.inference.codegen import write_project
    from gradrewrite.backends.mcu.packing import pack_inputs

    need_tools(target)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(4)) * 2
    graph = graph_of(QFloatOutNet(), x)
    facts = write_project(lower(graph), tmp_path / "mcu", source="test")
    fw = firmware.build_firmware(tmp_path / "mcu", target)
    raw, _ = qemu.run_firmware(fw.elf, pack_inputs([x.numpy()], facts["inputs"]), target)
    spec = facts["outputs"][0]
    got = np.frombuffer(raw, dtype=np.float32, count=int(np.prod(spec["shape"]))).reshape(spec["shape"])
    assert np.array_equal(got, int8.integer_reference(graph, x)[0].numpy())


@pytest.mark.parametrize("nm", [(2, 4), (1, 8)], ids=["2:4", "1:8"])
def test_int8_nm_sparse_weights_are_packed_and_bit_exact(nm, tmp_path):
    # 1:8 stores 3-bit positions, which straddle byte boundaries in the bitstream
    _check_int8(QNet(nm=nm), tmp_path, expect_nm=2)


def test_requantize_rounds_like_the_reference():
    import numpy as np
    for real in (0.0003, 0.01, 0.37, 0.9999, 1.7):
        mult, shift = int8.quantize_multiplier(real)
        acc = np.array([-1000001, -3, -1, 0, 1, 2, 777, 123456], np.int64)
        got = int8.requantize(acc, np.array(mult), np.array(shift))
        assert np.all(np.abs(got - acc * real) <= 0.5 + 1e-6 * np.abs(acc * real) + 1)


def test_fp32_nm_sparse_model_packs_weights_and_matches(tmp_path):
    model, x = small_cnn()
    graph = capture(model, x)
    run_pipeline(graph, "fold-bn,nm-sparsity(n=2,m=4)")
    prog = lower(graph)
    assert prog.notes["nm_layers"] >= 3
    dense = lower(graph, sparse=False)
    assert sum(b.nbytes for b in prog.consts) < 0.8 * sum(b.nbytes for b in dense.consts)
    (got,), _ = build_and_run(graph, tmp_path, x[0])
    ref = graph(x[0])[0]
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


class Unsupported3(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        y = torch.cumsum(self.a(x), 1)
        return torch.sort(self.b(y), 1)[0].sin()


def test_check_lists_every_unsupported_op():
    problems = check_graph(graph_of(Unsupported3(), torch.randn(2, 8)), "cortex-m4")
    assert [p.op for p in problems] == ["aten.cumsum", "aten.sort", "aten.sin"]
    assert all(p.reason for p in problems)


@pytest.mark.slow
def test_check_cli(tmp_path):
    (tmp_path / "badmod.py").write_text(
        "import torch\nfrom tests.backends.test_mcu_codegen_int8 import Unsupported3\n"
        "def make():\n    return Unsupported3(), (torch.randn(2, 8),)\n")
    import os
    root = os.getcwd()
    env_path = f"{tmp_path}{os.pathsep}{root}"
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env_path
    try:
        bad = run_cli("check", "--module", "badmod:make", "--target", "cortex-m4")
        model, x = small_cnn()
        torch.export.save(torch.export.export(model, x), str(tmp_path / "cnn.pt2"))
        good = run_cli("check", str(tmp_path / "cnn.pt2"), "--passes", "fold-bn")
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert [l.split(" at ")[0] for l in lines] == ["aten.cumsum", "aten.sort", "aten.sin"]
    assert "3 op(s) cannot be generated for cortex-m4" in bad.stderr
    assert good.returncode == 0 and "can be generated" in good.stdout


def test_quantize_pass_output_compiles_bit_exact(tmp_path):
    """The quantize pass's static int8 graph: integer conv/linear, the residual add and
    the max pool run as int8 kernels; compile() checks bit-exactness on the host build."""
    from gradrewrite.compiler import CompileOptions, compile_graph

    model, x = small_cnn()
    gen = torch.Generator().manual_seed(5)
    calib = [(torch.randn(1, 3, 32, 32, generator=gen),) for _ in range(4)]
    opts = CompileOptions(passes="fold-bn,quantize(mode=static)", backend="mcu", latency_runs=0,
                          verify_inputs=1, calibration=calib, backend_options={"target": "host"})
    art = compile_graph(capture(model, x), tmp_path / "out", opts)
    facts = art.report["mcu"]
    assert facts["int8_check"]["bit_exact_expected"] and facts["int8_check"]["bit_exact"]
    kernels = {op["kernel"] for op in facts["ops"]}
    assert {"gr_conv2d_s8", "gr_fc_s8", "gr_add_lut_s8", "gr_max_pool2d_s8"} <= kernels
    # int8 activations: the arena is far below the fp32 build's
    assert facts["arena_bytes"] < 40_000


def test_int8_transformer_is_checked_within_rounding(tmp_path):
    """Layer norm, softmax and gelu stay fp32 between the int8 linears: C and torch round
    them differently, so the check is relative error, and says why it is not bit-exact."""
    from examples.models import tiny_gpt
    from gradrewrite.compiler import CompileOptions, compile_graph

    model, x = tiny_gpt(n_layer=1, seq=16)
    gen = torch.Generator().manual_seed(5)
    calib = [(torch.randint(0, 512, (1, 16), generator=gen),) for _ in range(2)]
    opts = CompileOptions(passes="quantize(mode=static)", backend="mcu", latency_runs=0, verify_inputs=1,
                          calibration=calib, backend_options={"target": "host"})
    check = compile_graph(capture(model, x), tmp_path / "out", opts).report["mcu"]["int8_check"]
    assert not check["bit_exact_expected"]
    assert "gr_layer_norm_f32" in check["inexact_fp32_kernels"]
    assert check["relative_error"] < 1e-3
