"""quantize(method=gptq): structure, numerics against RTN and a naive reference, outliers;
loss=auto on an encoder (BertModel) vs a causal LM."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from examples.models import tiny_gpt
from gradrewrite.compiler import run_pipeline
from gradrewrite.errors import ConfigError, InputError
from gradrewrite.passes.quantize.gptq import gptq_quantize
from gradrewrite.passes.quantize.outliers import choose_loss
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.graph import op_name
from gradrewrite.rewrite.quant_ops import GROUPWISE_LINEAR, groupwise_weight, outlier_positions, unpack_bits
from gradrewrite.rewrite.registry import PassContext

D_IN = 128


class MLP(torch.nn.Module):
    """3 linear layers, weights ~ N(0, 1/fan_in): O(1) activations for O(1) inputs."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = torch.nn.Linear(D_IN, 256)
        self.fc2 = torch.nn.Linear(256, 256)
        self.fc3 = torch.nn.Linear(256, 64)
        with torch.no_grad():
            for fc in (self.fc1, self.fc2, self.fc3):
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) / fc.in_features ** 0.5)
                fc.bias.copy_(torch.randn(fc.bias.shape, generator=g) * 0.1)

    def forward(self, x):
        return self.fc3(torch.nn.functional.gelu(self.fc2(torch.nn.functional.gelu(self.fc1(x)))))


_MIX = torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(7)) / D_IN ** 0.5


def _inputs(n, seed, rows=32):
    """Correlated O(1) inputs: a low-dimensional signal mixed into every feature plus noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        z = torch.randn(rows, 16, generator=g) @ torch.randn(16, D_IN, generator=torch.Generator()
                                                             .manual_seed(3))
        out.append(((z * 0.3 + torch.randn(rows, D_IN, generator=g) * 0.3) @ _MIX * 2,))
    return out


@pytest.fixture(scope="module")
def mlp():
    model = MLP().eval()
    return model, capture(model, (torch.randn(32, D_IN),))


def _weights(graph):
    """{weight name: dequantized fp32 weight} of every groupwise_linear in the graph."""
    out = {}
    for n in graph.call_nodes():
        if n.target == GROUPWISE_LINEAR:
            a = [graph.attr(x) if isinstance(x, torch.fx.Node) and x.op == "get_attr" else x
                 for x in n.args]
            out[str(n.args[1].target).removesuffix("_packed")] = groupwise_weight(*a[1:4], *a[5:11])
    return out


def _quantize(graph, options, calib):
    q = graph.clone()
    res = run_pipeline(q, f"quantize(mode=weight-only,{options})", ctx=PassContext(calibration=calib))
    return q, res.records[-1].report


# ------------------------------------------------------------------------------- structure
def test_same_ops_and_storage_as_rtn(mlp):
    _, graph = mlp
    calib = _inputs(4, 1)
    rtn, _ = _quantize(graph, "bits=4,group=32,outliers=0.01,criterion=magnitude", calib)
    gq, report = _quantize(graph, "bits=4,group=32,outliers=0.01,criterion=magnitude,method=gptq",
                           calib)
    assert Counter(op_name(n) for n in rtn.call_nodes()) == Counter(op_name(n) for n in gq.call_nodes())
    assert not any(n.target == torch.ops.aten.linear.default for n in gq.call_nodes())
    bufs = lambda g: {k: (tuple(v.shape), v.dtype) for k, v in g.gm.state_dict().items()}
    assert bufs(rtn) == bufs(gq)
    assert report["method"] == "gptq" and [l["path"] for l in report["layers"]] == ["fc1", "fc2", "fc3"]
    assert all(l["gptq"]["hessian_error"] < l["gptq"]["hessian_error_rtn"] for l in report["layers"])
    assert len(report["error_report"]) == 3 and report["bits_per_weight"] > 4


def test_options_and_calibration_are_checked(mlp):
    _, graph = mlp
    for options, needle in [("mode=static,method=gptq", "method=gptq is for weight-only"),
                            ("mode=weight-only,bits=4,method=gptq,block=100", "block=100"),
                            ("mode=weight-only,bits=4,method=obq", "unknown method"),
                            ("mode=weight-only,bits=4,method=gptq,damp=0", "damp=0")]:
        with pytest.raises(ConfigError, match=needle):
            run_pipeline(graph.clone(), f"quantize({options})")
    with pytest.raises(InputError, match="method=gptq needs calibration data"):
        run_pipeline(graph.clone(), "quantize(mode=weight-only,bits=4,method=gptq)")


# ------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_held_out_inputs(mlp, bits):
    model, graph = mlp
    calib, held = _inputs(16, 1), _inputs(4, 99)
    rtn, _ = _quantize(graph, f"bits={bits},group=32", calib)
    gq, _ = _quantize(graph, f"bits={bits},group=32,method=gptq", calib)
    w_rtn, w_gq = _weights(rtn), _weights(gq)
    # each layer's output error on held-out inputs of the float model
    acts = {}
    hooks = [getattr(model, n).register_forward_pre_hook(
        lambda m, a, n=n: acts.setdefault(n, []).append(a[0])) for n in ("fc1", "fc2", "fc3")]
    with torch.no_grad():
        ref_out = [model(*x) for x in held]
    for h in hooks:
        h.remove()
    for name in ("fc1", "fc2", "fc3"):
        x = torch.cat(acts[name])
        w = getattr(model, name).weight.detach()
        ref = x @ w.T
        e = {k: float((x @ ws[f"{name}.weight"].T - ref).norm() / ref.norm())
             for k, ws in (("rtn", w_rtn), ("gptq", w_gq))}
        print(f"{bits}-bit g32 {name}: held-out layer rel. error rtn {e['rtn']:.4f} gptq {e['gptq']:.4f}")
        assert e["gptq"] < 0.85 * e["rtn"], e
    # and the whole model
    err = {}
    for k, g in (("rtn", rtn), ("gptq", gq)):
        err[k] = sum(float((g(*x)[0] - r).norm()) for x, r in zip(held, ref_out)) / \
            sum(float(r.norm()) for r in ref_out)
    print(f"{bits}-bit g32 model output rel. error rtn {err['rtn']:.4f} gptq {err['gptq']:.4f}")
    assert err["gptq"] < err["rtn"], err


def _naive_gptq(w, h, bits, group, mask, damp, act_order):
    """Column by column, every remaining column updated at once, H^-1 by explicit inverse."""
    w = w.double().clone()
    n, k = w.shape
    qmax = 2 ** bits - 1
    h = h.double().clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    order = list(torch.argsort(torch.diagonal(h), descending=True, stable=True)) if act_order \
        else list(range(k))

    def params(block, keep):
        lo = torch.where(keep, torch.inf, block).amin(1).clamp(max=0)
        hi = torch.where(keep, -torch.inf, block).amax(1).clamp(min=0)
        s = ((hi - lo) / qmax).clamp(min=1e-7).float()
        s = (s * (1 + 2 ** -10)).half().double()
        return s, torch.clamp(torch.round(-lo / s), 0, qmax)

    static = {g: params(w[:, g * group:(g + 1) * group], mask[:, g * group:(g + 1) * group])
              for g in range(-(-k // group))} if act_order else {}
    p = torch.tensor([int(c) for c in order])
    w, mask = w[:, p], mask[:, p]
    u = torch.linalg.cholesky(torch.linalg.inv(h[p][:, p]), upper=True)
    out = torch.zeros_like(w)
    cur = {}
    for j in range(k):
        col = int(p[j])
        if act_order:
            s, z = static[col // group]
        else:
            if col % group == 0:
                cur = params(w[:, j:j + group], mask[:, j:j + group])
            s, z = cur
        q = (torch.clamp(torch.round(w[:, j] / s) + z, 0, qmax) - z) * s
        q = torch.where(mask[:, j], w[:, j], q)
        out[:, j] = q
        err = (w[:, j] - q) / u[j, j]
        for c in range(j + 1, k):
            w[:, c] -= err * u[j, c]
    return out[:, torch.argsort(p)]


@pytest.mark.parametrize("n, k, group, block, act_order", [
    (4, 8, 8, 4, False), (4, 8, 8, 4, True), (6, 32, 8, 16, False), (6, 32, 16, 8, False),
    (6, 32, 8, 16, True), (4, 24, 16, 8, False), (4, 24, 16, 8, True)])   # 24: a padded group
def test_column_updates_equal_naive_reference(n, k, group, block, act_order):
    g = torch.Generator().manual_seed(k + group + block)
    x = torch.randn(64, 3, generator=g) @ torch.randn(3, k, generator=g) + 0.3 * torch.randn(64, k, generator=g)
    h = 2 * x.double().T @ x.double() / 64
    w = torch.randn(n, k, generator=g)
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask[0, 1] = mask[n - 1, k - 2] = mask[2, k // 2] = True      # outliers: exact, no error pushed
    q, _ = gptq_quantize(w, h, 3, group, outliers=mask, damp=0.01, block=block,
                         act_order=act_order, dtype=torch.float64)
    ref = _naive_gptq(w, h, 3, group, mask, 0.01, act_order)
    got = q.dequantized()
    torch.testing.assert_close(got[~mask], ref[~mask].float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(got[mask], ref[mask].half().float(), rtol=0, atol=0)
    # the compensation changed the weights (it is not RTN)
    assert not torch.allclose(ref, w.double(), atol=1e-3)


def test_outliers_exact_and_out_of_group_ranges(mlp):
    model, graph = mlp
    g = graph.clone()
    with torch.no_grad():
        g.attr("fc1.weight")[5, 3] = 40.0            # a weight magnitude criterion must pick
    q, report = _quantize(g, "bits=4,group=32,outliers=0.01,criterion=magnitude,method=gptq",
                          _inputs(8, 1))
    node = next(n for n in q.call_nodes() if n.target == GROUPWISE_LINEAR
                and str(n.args[1].target).startswith("fc1"))
    scales, zeros = q.attr(node.args[2]), q.attr(node.args[3])
    vals = q.attr(node.args[5])
    rows, cols = outlier_positions(q.attr(node.args[6]), q.attr(node.args[7]))
    packed = q.attr(node.args[1])
    assert float(scales[5, 0]) < 1.0                  # 40 is not in its group's range
    assert (5, 3) in set(zip(rows.tolist(), cols.tolist()))
    assert report["layers"][0]["outliers"] == round(0.01 * 256 * D_IN) == vals.numel()
    w = _weights(q)["fc1.weight"]
    # outliers hold their stored fp16 value exactly; their low-bit code is the zero point
    torch.testing.assert_close(w[rows, cols.long()], vals.float(), rtol=0, atol=0)
    assert abs(float(w[5, 3]) - 40.0) < 0.5
    codes = unpack_bits(packed, 4, 32).reshape(256, -1)
    zp = unpack_bits(zeros, 4, scales.shape[1]).repeat_interleave(32, 1)
    assert torch.equal(codes[rows, cols.long()], zp[rows, cols.long()])


def test_progress_per_layer(mlp):
    _, graph = mlp
    seen = []
    run_pipeline(graph.clone(), "quantize(mode=weight-only,bits=4,group=32,method=gptq)",
                 ctx=PassContext(calibration=_inputs(2, 1), progress=lambda d, i, t: seen.append(d)))
    layers = [d for d in dict.fromkeys(seen) if d.startswith("gptq layer")]
    assert [d.split(":")[0] for d in layers] == ["gptq layer 1/3 fc1", "gptq layer 2/3 fc2",
                                                 "gptq layer 3/3 fc3"]


# ------------------------------------------------------------------------------- loss=auto
@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=128,
                                  max_position_embeddings=64, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 300, (2, 16))
    g = torch.Generator().manual_seed(5)
    calib = [(torch.randint(0, 300, (2, 16), generator=g),) for _ in range(4)]
    return model, capture(model, (ids,)), calib


def test_encoder_loss_auto_is_output_distance(bert):
    _, graph, calib = bert
    q, report = _quantize(graph, "bits=4,outliers=0.01,criterion=gradient", calib)
    assert report["loss"] == "mse"
    assert report["loss_reason"].startswith("chose output-distance")
    assert "not vocabulary-wide" in report["loss_reason"] and "300 rows" in report["loss_reason"]
    assert sum(l["outliers"] for l in report["layers"]) > 0
    # GWQ outliers + GPTQ on the encoder
    gq, rep = _quantize(graph, "bits=4,group=64,outliers=0.01,criterion=gradient,method=gptq", calib)
    assert rep["loss"] == "mse" and rep["method"] == "gptq"
    x = calib[0]
    ref = graph(*x)[0]
    rel = float((gq(*x)[0] - ref).norm() / ref.norm())
    assert rel < 0.2, rel


def test_causal_lm_is_still_detected_and_bad_explicit_loss_is_one_line(bert):
    model, (ids,) = tiny_gpt(vocab=64, d_model=32, n_layer=1, n_head=2, seq=16, tie_weights=False)
    loss, why = choose_loss(capture(model, (ids,)), "auto")
    assert loss == "causal-lm" and "vocabulary-wide" in why
    _, graph, calib = bert
    with pytest.raises(ConfigError, match="loss=causal-lm needs a language model") as info:
        run_pipeline(graph.clone(), "quantize(mode=weight-only,bits=4,outliers=0.01,"
                                    "criterion=gradient,loss=causal-lm)", ctx=PassContext(calibration=calib))
    line = info.value.one_line()
    assert "\n" not in line and "use loss=mse" in line


def test_clip_search_never_raises_the_weighted_rounding_error():
    """The searched range keeps every row's diag(H)-weighted rounding error at or below the
    full range's (the full range is one of the candidates), and shrinks where a few large
    weights would waste levels."""
    from gradrewrite.passes.quantize.gptq import clipped_group_params
    from gradrewrite.passes.quantize.weight_only import group_params

    g = torch.Generator().manual_seed(0)
    span = torch.randn(64, 128, generator=g)
    span[:, 0] *= 8                                       # one large weight per row
    keep = torch.zeros_like(span, dtype=torch.bool)
    hdiag = torch.rand(128, generator=g) + 0.1

    def err(s16, z):
        s = s16.float()[:, None]
        q = (torch.clamp(torch.round(span / s) + z[:, None], 0, 15) - z[:, None]) * s
        return ((span - q) ** 2 * hdiag).sum(1)

    full, searched = err(*group_params(span, keep, 4)), err(*clipped_group_params(span, keep, 4, hdiag))
    assert (searched <= full + 1e-6).all() and searched.mean() < 0.95 * full.mean()



@pytest.mark.parametrize("with_outliers", [False, True])
def test_clip_search_equals_its_per_factor_definition(with_outliers):
    """The search finds each group's range once and scales it per factor: the scales and
    zero points are exactly those of ``group_params`` on the shrunk span, the first factor
    with the least weighted error chosen, also with outliers and a transposed mask."""
    from gradrewrite.passes.quantize.gptq import CLIP_FACTORS, clipped_group_params
    from gradrewrite.passes.quantize.weight_only import group_params

    g = torch.Generator().manual_seed(1)
    span = torch.randn(2, 96, 64, generator=g) * torch.rand(2, 96, 1, generator=g)
    span[0, :4] = span[0, :4].abs()                       # all-positive rows: 0 widens the range
    keep = (torch.rand(64, 96, generator=g) < 0.03).t()[None] if with_outliers else \
        torch.zeros(1, 96, 64, dtype=torch.bool)
    if with_outliers:
        keep[0, 5] = True                                 # a row kept whole
    hdiag = torch.rand(64, generator=g) + 0.1
    keep_full = keep.expand_as(span)
    best = None
    for f in CLIP_FACTORS:
        s16, z = group_params(span * f, keep_full, 4)
        s = s16.float()[..., None]
        q = (torch.clamp(torch.round(span / s) + z[..., None], 0, 15) - z[..., None]) * s
        err = (torch.where(keep_full, 0.0, span - q) ** 2 * hdiag).sum(-1)
        if best is None:
            best = (err, s16, z)
        else:
            better = err < best[0]
            best = (torch.where(better, err, best[0]), torch.where(better, s16, best[1]),
                    torch.where(better, z, best[2]))
    s16, z = clipped_group_params(span, keep, 4, hdiag)
    assert torch.equal(s16, best[1]) and torch.equal(z, best[2])

def test_lower_inverse_matches_a_triangular_solve():
    """The by-halves inverse of a Cholesky factor (odd sizes recurse unevenly)."""
    from gradrewrite.passes.quantize.gptq import _lower_inverse

    g = torch.Generator().manual_seed(0)
    a = torch.randn(700, 900, generator=g, dtype=torch.float64)
    m = torch.linalg.cholesky(a @ a.T / 900 + 0.1 * torch.eye(700, dtype=torch.float64))
    ref = torch.linalg.solve_triangular(m, torch.eye(700, dtype=torch.float64), upper=False)
    got = _lower_inverse(m)
    assert torch.allclose(got, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    assert torch.equal(torch.triu(got, 1), torch.zeros_like(got))


def test_shared_factors_change_nothing():
    """Layers reading one input (q/k/v) reuse its inverse-Hessian factors: the same codes,
    scales and dampening as factorising for each layer."""
    from gradrewrite.passes.quantize.gptq import FactorCache, choose_damp, gptq_quantize

    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 96, generator=g)
    h = (x.T @ x).double()
    halves = [((x[:24].T @ x[:24]).double(), 24), ((x[24:].T @ x[24:]).double(), 24)]
    cache = FactorCache()
    for i, n in enumerate((32, 16, 16)):
        w = torch.randn(n, 96, generator=g) * 0.02
        cache.keep = i < 2
        d, errs = choose_damp(w, h, halves, 4, 32, factors=cache)
        d0, errs0 = choose_damp(w, h, halves, 4, 32)
        assert (d, errs) == (d0, errs0)
        q, st = gptq_quantize(w, h, 4, 32, damp=d, factors=cache)
        q0, st0 = gptq_quantize(w, h, 4, 32, damp=d)
        assert torch.equal(q.packed, q0.packed) and torch.equal(q.scales, q0.scales) and st == st0
    assert cache.entries      # kept for the layers that followed
