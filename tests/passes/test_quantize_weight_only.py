"""quantize(mode=weight-only): packing, half-step numerics, GWQ outlier selection, outlier storage."""
from __future__ import annotations

import pytest
import torch

from examples.models import tiny_gpt
from gradrewrite.compiler import run_pipeline
from gradrewrite.errors import ConfigError, GradrewriteError, InputError
from gradrewrite.passes.quantize.outliers import hessian_scores, gradient_scores, top_k_mask
from gradrewrite.passes.quantize.layers import find_layers
from gradrewrite.passes.quantize.weight_only import quantize_groupwise
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.graph import op_name
from gradrewrite.rewrite.quant_ops import (GROUPWISE_LINEAR, groupwise_weight, outlier_positions, pack_bits,
                                           unpack_bits)
from gradrewrite.rewrite.registry import PassContext


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = torch.nn.Linear(200, 64)     # K not a multiple of the group: padded
        self.fc2 = torch.nn.Linear(64, 8)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(64, 200, generator=g) * 0.1)
            self.fc1.weight[3, 7] = 4.0         # an obvious outlier

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def mlp_graph():
    return capture(MLP().eval(), (torch.randn(4, 200),))


def _calib(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 200, generator=g),) for _ in range(n)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (5, 3, 64))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, 64 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 64), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantized_within_half_step(bits):
    w = torch.randn(16, 200) * 0.05
    q = quantize_groupwise(w, bits, 32)
    deq = q.dequantized()
    step = q.scales.float().repeat_interleave(32, dim=1)[:, :200]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert q.scales.dtype == torch.float16 and q.packed.shape == (16, 7, 32 * bits // 8)


def test_outliers_are_top_k_and_bit_exact_fp16():
    w = torch.randn(32, 128)
    score = torch.rand(32, 128)                 # distinct scores: the top-k is unique
    mask = top_k_mask(score, 0.01)
    k = round(0.01 * w.numel())
    assert mask.sum() == k
    assert set(mask.flatten().nonzero().flatten().tolist()) == \
        set(torch.topk(score.flatten(), k).indices.tolist())
    q = quantize_groupwise(w, 3, 64, mask)
    rows, cols = mask.nonzero(as_tuple=True)
    assert torch.equal(q.values, w[rows, cols].half())                      # bit-exact fp16
    # 16-bit columns (col - 32768), 8-bit per-row counts
    assert q.cols.dtype == torch.int16 and torch.equal(q.cols.long() + 32768, cols)
    assert q.counts.dtype == torch.uint8 and q.counts.shape == (32,) and int(q.counts.sum()) == k
    assert torch.equal(torch.stack(outlier_positions(q.cols, q.counts)), torch.stack([rows, cols]))
    assert torch.equal(q.dequantized()[mask], w[mask].half().float())


def test_outlier_storage_widths_and_bits():
    """Each part counted at its stored width; wider dtypes only where the data needs them."""
    w = torch.randn(4, 70000)
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[0, :300] = True                                # a row with more than 255 outliers
    mask[1, 69999] = True                               # a column past 65535
    q = quantize_groupwise(w, 4, 128, mask)
    assert q.cols.dtype == torch.int32 and q.counts.dtype == torch.int16
    rows, cols = outlier_positions(q.cols, q.counts)
    assert torch.equal(q.dequantized()[rows, cols], w[mask].half().float())
    bits = q.storage_bits()
    assert bits["outlier_values"] == 301 * 16 and bits["outlier_cols"] == 301 * 32
    assert bits["outlier_rows"] == 4 * 16
    small = quantize_groupwise(torch.randn(8, 256), 4, 64, top_k_mask(torch.rand(8, 256), 0.01))
    nnz = small.values.numel()
    assert small.storage_bits() == {"codes": 8 * 256 * 4, "scales": 8 * 4 * 16, "zero_points": 8 * 2 * 8,
                                    "outlier_values": nnz * 16, "outlier_cols": nnz * 16, "outlier_rows": 8 * 8,
                                    "input_order": 0}
    none = quantize_groupwise(torch.randn(8, 256), 4, 64).storage_bits()
    assert none["outlier_values"] == none["outlier_cols"] == none["outlier_rows"] == 0


def test_outliers_excluded_from_group_range():
    w = torch.randn(4, 64) * 0.01
    w[0, 5] = 10.0
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[0, 5] = True
    with_out = quantize_groupwise(w, 4, 64, mask)
    without = quantize_groupwise(w, 4, 64)
    assert with_out.scales[0, 0] < without.scales[0, 0] / 50    # range set by the small weights
    assert (with_out.dequantized() - w).abs().max() < (without.dequantized() - w).abs().max()


def test_pass_structure_and_numerics(mlp_graph):
    g = mlp_graph.clone()
    res = run_pipeline(g, "quantize(bits=4,group=64,outliers=0.01,criterion=magnitude)")
    assert g.op_histogram().get("gradrewrite.groupwise_linear") == 2
    assert "aten.linear" not in g.op_histogram()
    rep = res.records[-1].report
    assert rep["mode"] == "weight-only" and rep["criterion"] == "magnitude"
    fc1 = next(l for l in rep["layers"] if l["path"] == "fc1")
    assert fc1["outliers"] == round(0.01 * 64 * 200)
    # honest accounting: 4-bit codes (K padded to 256), fp16 scales, packed zeros, outliers
    # at 16 (value) + 16 (column) bits and one uint8 count per row
    expected = (64 * 256 * 4 + 64 * 4 * 16 + 64 * 2 * 8 + fc1["outliers"] * 32 + 64 * 8) / (64 * 200)
    assert fc1["bits_per_weight"] == pytest.approx(expected, abs=1e-3)
    # the big weight is an outlier, stored exactly
    node = next(n for n in g.call_nodes() if n.target == GROUPWISE_LINEAR and "fc1" in str(n.args[1].target))
    vals = g.attr(node.args[5])
    assert (vals == torch.tensor(4.0, dtype=torch.float16)).any()
    # numerics: the graph is the float MLP with the dequantized weights (+ fp16 outliers)
    weights = {}
    for n in g.call_nodes():
        if n.target == GROUPWISE_LINEAR:
            t = [g.attr(a) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a for a in n.args]
            weights[str(n.args[1].target).split(".")[0]] = (groupwise_weight(*t[1:4], *t[5:8], *t[8:11]), t[4])
    x = torch.randn(4, 200)
    h = torch.relu(torch.nn.functional.linear(x, *weights["fc1"]))
    torch.testing.assert_close(g(x)[0], torch.nn.functional.linear(h, *weights["fc2"]),
                               rtol=1e-5, atol=1e-6)
    # and each dequantized weight is within half a step of the float one (outliers exact)
    w_f = mlp_graph.attr("fc1.weight")
    step = g.attr(next(n for n in g.nodes if n.op == "get_attr" and str(n.target) == "fc1.weight_scales"))
    step = step.float().repeat_interleave(64, dim=1)[:, :200]
    assert ((weights["fc1"][0] - w_f).abs() <= step / 2 + 1e-6).all()
    assert rep["error_report"] and {e["path"] for e in rep["error_report"]} == {"fc1", "fc2"}


def test_hessian_and_gradient_scores_are_real(mlp_graph):
    layers, _ = find_layers(mlp_graph, "op:linear", "", kinds=("linear",), what="t")
    sq = {l.param: torch.ones(mlp_graph.attr(l.weight_node).shape[1]) for l in layers}
    h = hessian_scores(mlp_graph, layers, sq)
    assert torch.allclose(h["fc1.weight"], mlp_graph.attr("fc1.weight") ** 2)
    # gradient criterion with a user loss equals torch.autograd on the eager model
    model = MLP().eval()
    model.load_state_dict({k: mlp_graph.attr(k) for k in model.state_dict()})  # same biases
    data = _calib(2)
    loss = lambda outs, inputs: (outs[0] ** 2).sum()
    scores = gradient_scores(mlp_graph, layers, data, loss=loss, aggregation="square", rtn=lambda w: w)
    expected = torch.zeros_like(model.fc1.weight)
    for (x,) in data:
        model.zero_grad()
        (model(x) ** 2).sum().backward()
        expected += model.fc1.weight.grad ** 2
    torch.testing.assert_close(scores["fc1.weight"], expected, rtol=1e-4, atol=1e-6)


def test_gradient_criterion_on_causal_lm_selects_top_k_of_gradients():
    model, (ids,) = tiny_gpt(vocab=64, d_model=32, n_layer=1, n_head=2, seq=16, tie_weights=False)
    graph = capture(model, (ids,))
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randint(0, 64, (1, 16), generator=g),) for _ in range(2)]
    layers, _ = find_layers(graph, "op:linear", "", kinds=("linear",), what="t")
    scores = gradient_scores(graph, layers, calib, loss="causal-lm", aggregation="abs", rtn=lambda w: w)
    # reference: next-token cross-entropy gradients from eager autograd
    ref = torch.zeros_like(model.lm_head.weight)
    for (x,) in calib:
        model.zero_grad()
        logits = model(x)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1)).backward()
        ref += model.lm_head.weight.grad.abs()
    torch.testing.assert_close(scores["lm_head.weight"], ref, rtol=1e-4, atol=1e-7)
    q = graph.clone()
    res = run_pipeline(q, "quantize(bits=4,group=16,outliers=0.05,criterion=gradient)",
                       ctx=PassContext(calibration=calib))
    assert res.records[-1].report["loss"] == "causal-lm"
    node = next(n for n in q.call_nodes() if n.target == GROUPWISE_LINEAR
                and str(n.args[1].target).startswith("lm_head"))
    rows, cols = outlier_positions(q.attr(node.args[6]), q.attr(node.args[7]))
    kept = set((rows * 32 + cols).tolist())
    k = round(0.05 * ref.numel())
    assert kept == set(torch.topk(ref.flatten(), k).indices.tolist())


@pytest.mark.parametrize("options, needle", [
    ("bits=5", "bits=5 is out of range"),
    ("bits=4,group=100", "group=100 is out of range"),
    ("bits=4,outliers=0.7", "outliers=0.7 is out of range"),
    ("bits=4,criterion=random", "unknown criterion"),
    ("mode=static,bits=4", "static quantization is int8"),
])
def test_bad_options(mlp_graph, options, needle):
    with pytest.raises(ConfigError, match=needle):
        run_pipeline(mlp_graph.clone(), f"quantize({options})")


def test_gradient_needs_calibration_and_selector_must_match(mlp_graph):
    with pytest.raises(InputError, match="needs calibration data"):
        run_pipeline(mlp_graph.clone(), "quantize(bits=4,outliers=0.01,criterion=gradient)")
    with pytest.raises(GradrewriteError, match="matches no layer"):
        run_pipeline(mlp_graph.clone(), "quantize(bits=4,select=path:nothing.*)")


def test_model_without_linear_layers_is_refused():
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.c(x)

    graph = capture(Conv().eval(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(GradrewriteError, match="no layer can be quantized"):
        run_pipeline(graph, "quantize(bits=4)")
    assert all(op_name(n) != "gradrewrite.groupwise_linear" for n in graph.call_nodes())


def test_spread_rows_keeps_the_same_number_in_every_row(mlp_graph):
    score = torch.rand(32, 200)
    mask = top_k_mask(score, 0.02, "rows")
    assert (mask.sum(1) == 4).all()                        # round(0.02 * 200) per row
    assert torch.equal(mask, score >= score.topk(4, dim=1).values[:, -1:])
    g = mlp_graph.clone()
    rep = run_pipeline(g, "quantize(mode=weight-only,bits=4,group=16,outliers=0.05,criterion=magnitude,"
                          "spread=rows)").records[-1].report
    for layer in rep["layers"]:
        n, k = layer["shape"]
        assert layer["outliers"] == n * round(0.05 * k)
