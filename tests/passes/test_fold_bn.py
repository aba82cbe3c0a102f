"""fold-bn: structure (ops out, rule counts), numerics vs eager, selectors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gradrewrite.errors import GradrewriteError
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.graph import module_path, op_kind
from gradrewrite.rewrite.pass_manager import PassManager
from gradrewrite.rewrite.pipeline import build_passes, parse_pipeline


def fold(graph, text="fold-bn"):
    return PassManager(build_passes(parse_pipeline(text))).run(graph).records[-1]


def test_structure(convbn_graph):
    rec = fold(convbn_graph)
    assert rec.report["fired"] == {"fold-bn-into-conv": 2, "fold-bn-into-linear": 1}
    assert rec.report["where"]["fold-bn-into-conv"] == ["features.0", "features.3"]
    assert rec.report["skipped"] == {}
    # shared conv's output feeds the residual too: its bn must stay
    assert rec.report["unfolded"] == ["shared_bn"]
    left = [module_path(n) for n in convbn_graph.call_nodes() if op_kind(n) == "batch_norm"]
    assert left == ["shared_bn"]
    names = {n for n, _ in convbn_graph.gm.named_parameters()}
    assert {"features.0.bias", "features.0.weight", "head.weight", "head.bias"} <= names
    assert not any(n.startswith(("features.1.", "features.4.", "head_bn.")) for n in names)
    # the folded conv keeps the conv's provenance
    conv0 = next(n for n in convbn_graph.call_nodes() if module_path(n) == "features.0")
    assert conv0.meta["gradrewrite"]["folded_bn"] == "features.1" and "stack_trace" in conv0.meta


def test_numerics_against_eager(convbn_model, convbn_graph):
    fold(convbn_graph)
    for seed in range(4):
        x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(seed)) * 3
        ref = convbn_model(x)
        got = convbn_graph(x)[0]
        # fp32 rounding: a few ulps of the output scale
        assert (got - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())


def test_does_not_touch_the_captured_model(convbn_model, convbn_graph):
    w = convbn_model.features[0].weight.detach().clone()
    fold(convbn_graph)
    torch.testing.assert_close(convbn_model.features[0].weight, w, rtol=0, atol=0)


def test_selector_limits_folding(convbn_graph):
    rec = fold(convbn_graph, "fold-bn(select='path:features.1')")
    assert rec.report["fired"] == {"fold-bn-into-conv": 1}
    with pytest.raises(GradrewriteError, match="matches no layer"):
        fold(convbn_graph, "fold-bn(select='path:nothing.*')")


def test_conv1d_conv3d_and_no_affine():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4, affine=False)
            self.c3, self.b3 = nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2)

        def forward(self, x, v):
            return self.b1(self.c1(x)).sum() + self.b3(self.c3(v)).sum()

    m = M()
    m.train()
    for _ in range(2):
        m(torch.randn(3, 2, 9), torch.randn(3, 1, 4, 4, 4))
    m.eval()
    args = (torch.randn(1, 2, 9), torch.randn(1, 1, 4, 4, 4))
    g = capture(m, args)
    rec = fold(g)
    assert rec.report["folded"] == 2
    torch.testing.assert_close(g(*args)[0], m(*args), rtol=1e-5, atol=1e-5)


def test_conv_called_without_bias_argument():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 2, 3, 3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(torch.nn.functional.conv2d(x, self.w))   # aten.conv2d(x, w)

    m = M()
    m.bn.running_mean.uniform_(-1, 1)
    m.bn.running_var.uniform_(0.5, 2)
    m.eval()
    x = torch.randn(1, 2, 6, 6)
    g = capture(m, (x,))
    assert len(next(n for n in g.call_nodes() if op_kind(n) == "conv").args) == 2
    assert fold(g).report["folded"] == 1
    torch.testing.assert_close(g(x)[0], m(x), rtol=1e-5, atol=1e-5)


def test_linear_on_3d_input_is_skipped_with_reason():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):                # x: (N, L, C): bn over channels after transpose
            return self.bn(self.fc(x).transpose(1, 2))

    g = capture(M().eval(), (torch.randn(2, 3, 4),))
    rec = fold(g)
    assert rec.report["folded"] == 0 and rec.report["unfolded"] == ["bn"]


def test_no_batch_norm_is_a_noop(convbn_graph):
    g = capture(nn.Linear(3, 2), (torch.randn(1, 3),))
    rec = fold(g)
    assert rec.changed is False and rec.report["folded"] == 0
