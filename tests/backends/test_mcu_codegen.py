"""mcu code generator: the generated C, built for the host, against torch.

Tolerances are fp32 rounding: the kernels sum in a different order than torch, so
we allow a few ulps of the output's magnitude (rel 1e-5 of max |y|).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.models import mobilenet_v2, small_cnn, tiny_gpt
from gradrewrite.backends.mcu.inference.codegen import arena_buffers, plan_arena
from gradrewrite.backends.mcu.inference.lowering import Unsupported, lower
from gradrewrite.compiler import CompileOptions, compile_graph
from gradrewrite.rewrite.capture import capture

from .mcu_helpers import build_and_run, graph_of

REL = 1e-5


def assert_close(got: torch.Tensor, ref: torch.Tensor, rel: float = REL) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    scale = ref.abs().max().clamp_min(1e-6)
    err = (got - ref).abs().max() / scale
    assert err <= rel, f"relative error {err:.3g} > {rel:g}"


# ----------------------------------------------------------------- example models, end to end
@pytest.mark.parametrize("name,factory", [
    ("small_cnn", small_cnn),
    ("mobilenet_v2", lambda: mobilenet_v2(resolution=96)),
    ("tiny_gpt", tiny_gpt),
])
@pytest.mark.slow
def test_example_models_compile_and_match_torch(name, factory, tmp_path):
    model, x = factory()
    graph = capture(model, x)
    opts = CompileOptions(passes="fold-bn", backend="mcu", latency_runs=0, verify_inputs=2,
                          backend_options={"target": "host"})
    art = compile_graph(graph, tmp_path / "out", opts)   # raises if the host build disagrees
    report = art.report
    assert report["verification"]["relative_error"] <= 1e-5
    facts = report["mcu"]
    assert facts["arena_bytes"] <= facts["naive_bytes"]
    assert facts["arena_bytes"] >= facts["lower_bound_bytes"]
    model_h = (tmp_path / "out" / "mcu" / "model.h").read_text()
    assert f"#define MODEL_ARENA_BYTES {facts['arena_bytes']}" in model_h
    assert "int model_run(const void *in, void *out);" in model_h
    model_c = (tmp_path / "out" / "mcu" / "model.c").read_text()
    assert "malloc" not in model_c
    assert len(re.findall(r"static uint8_t arena\[", model_c)) == 1
    # fresh input through the artifact's own runner
    y = art(torch.randn_like(x[0]) if x[0].is_floating_point() else x[0])
    assert y[0].shape == tuple(facts["outputs"][0]["shape"])


# ----------------------------------------------------------------- kernels vs torch
class ConvZoo(nn.Module):
    """conv variants: general, strided + dilated, grouped, depthwise, pointwise, bias-free."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 12, 1, bias=False)
        self.c = nn.Conv2d(12, 4, (3, 1), stride=(1, 2), padding=(0, 1))

    def forward(self, x):
        x = F.relu(self.a(x))
        x = F.hardtanh(self.b(x), 0.0, 6.0)
        x = F.hardswish(self.dw(x))
        x = torch.sigmoid(self.pw(x))
        return self.c(x)


class PoolZoo(nn.Module):
    def forward(self, x):
        a = F.max_pool2d(x, 3, 2, 1)
        b = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
        c = F.avg_pool2d(x, 2)
        d = F.adaptive_avg_pool2d(x, 3)
        e = x.mean((2, 3), keepdim=True)
        return a, b, c, d, F.hardsigmoid(e)


class ElementwiseZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.register_buffer("bias", torch.randn(16))

    def forward(self, x, y):
        a = x + y[:, :1] * 2.0          # broadcast + scalar
        b = (a - self.bias) / 1.5
        c = torch.softmax(b, -1) + torch.log_softmax(a, -1)
        d = F.gelu(self.ln(c)) * F.gelu(b, approximate="tanh")
        e = torch.cat([d[:, :4], F.silu(c).t().contiguous().t()[:, 4:], torch.tanh(a)], 1)
        return e.view(2, -1, 4).permute(2, 0, 1).reshape(4, -1), F.relu6(a - 1)


class AttentionZoo(nn.Module):
    def forward(self, q, k, v, mask):
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        b = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        c = torch.matmul(q, k.transpose(-1, -2)) @ v
        d = torch.bmm(q.flatten(0, -3), k.flatten(0, -3).transpose(1, 2))
        if q.dim() == 4:  # heads-last output: the transpose back costs no copy
            e = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
            return a, b, c, d, e.reshape(q.shape[0], q.shape[2], -1)
        return a, b, c, d


def _inputs(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g) for s in shapes)


@pytest.mark.parametrize("module,shapes", [
    (ConvZoo(), [(1, 3, 17, 15)]),
    (PoolZoo(), [(1, 4, 11, 9)]),
    (ElementwiseZoo(), [(2, 16), (2, 16)]),
    (AttentionZoo(), [(1, 2, 6, 8), (1, 2, 7, 8), (1, 2, 7, 8), (1, 2, 6, 7)]),
    (AttentionZoo(), [(2, 6, 8), (2, 7, 8), (2, 7, 8), (2, 6, 7)]),
], ids=["conv", "pool", "elementwise", "attention", "attention3d"])
def test_kernels_match_torch(module, shapes, tmp_path):
    torch.manual_seed(0)
    module = module.eval()
    x = _inputs(*shapes)
    graph = graph_of(module, *x)
    fresh = _inputs(*shapes, seed=1)
    got, facts = build_and_run(graph, tmp_path, *fresh)
    with torch.no_grad():
        ref = module(*fresh)
    ref = list(ref) if isinstance(ref, tuple) else [ref]
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert_close(g, r)


def test_views_cost_no_copies(tmp_path):
    """Reshape/split/transpose feeding a strided-aware kernel (attention) emit no copy."""
    model, x = tiny_gpt(n_layer=1, seq=8)
    prog = lower(capture(model, x))
    kernels = [s.kernel for s in prog.steps]
    assert "gr_sdpa_f32" in kernels
    # the attention writes its output heads-last, so transpose -> reshape is free too
    assert "gr_copy_nd" not in kernels


def test_inplace_reuse_never_clobbers_a_live_alias(tmp_path):
    class M(nn.Module):
        def forward(self, x):
            y = torch.relu(x * 2)
            return y + y.t(), torch.sigmoid(y)[1:, ::2]

    x = torch.randn(5, 5)
    got, facts = build_and_run(graph_of(M(), x), tmp_path, x)
    for g, r in zip(got, M()(x)):
        assert_close(g, r)


def test_relu_fuses_into_conv():
    model, x = small_cnn()
    graph = capture(model, x)
    from gradrewrite.compiler import run_pipeline
    run_pipeline(graph, "fold-bn")
    prog = lower(graph)
    ops = [s.op for s in prog.steps]
    assert "aten.conv2d+aten.relu_" in ops
    assert not any(s.kernel == "gr_unary_f32" for s in prog.steps[:2])


# ----------------------------------------------------------------- arena
@pytest.mark.parametrize("factory", [small_cnn, tiny_gpt])
def test_arena_plan_simulates_without_overlap(factory):
    model, x = factory()
    prog = lower(capture(model, x))
    arena = plan_arena(prog)
    arena.plan.check()   # replays the schedule: no two live buffers share a byte
    buffers = {b.name: b for b in arena_buffers(prog)}
    offsets = arena.plan.offsets
    # independent replay: at every step, live buffers are disjoint unless an in-place pair
    for step in range(len(prog.steps)):
        live = [b for b in buffers.values() if b.start <= step <= b.end]
        for i, a in enumerate(live):
            for b in live[i + 1:]:
                overlap = offsets[a.name] < offsets[b.name] + b.size and offsets[b.name] < offsets[a.name] + a.size
                pair = (a.inplace_of == b.name and a.start == b.end == step) or \
                       (b.inplace_of == a.name and b.start == a.end == step)
                assert not overlap or pair, (a, b)
    assert arena.peak_live_bytes <= arena.plan.arena_bytes < arena.naive_bytes


# ----------------------------------------------------------------- errors
def test_unsupported_op_raises_with_module_path():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.cumsum(self.fc(x), 1)

    with pytest.raises(Unsupported, match="aten.cumsum"):
        lower(graph_of(M(), torch.randn(1, 4)))
