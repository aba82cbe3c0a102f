"""quantize(method=awq | awq-gptq): where scales fold (Llama, BERT, tiny GPT, small MLPs),
exactness of scaling + folding before rounding, error against RTN on held-out inputs for
inputs with outlier channels, GWQ outliers, options."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from examples.models import tiny_gpt
from gradrewrite.compiler import run_pipeline
from gradrewrite.errors import ConfigError, InputError
from gradrewrite.passes.quantize.awq import apply_fold, awq_scale, fake_quantize, find_fold, search_clip
from gradrewrite.passes.quantize.layers import find_layers, layer_input
from gradrewrite.passes.quantize.weight_only import quantize_groupwise
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.graph import module_path
from gradrewrite.rewrite.quant_ops import groupwise_weight
from gradrewrite.rewrite.registry import PassContext
from tests.model_zoo import hf_bert, hf_llama

aten = torch.ops.aten


def _groups(graph):
    layers, _ = find_layers(graph, "op:linear", "", kinds=("linear",), what="test")
    groups = {}
    for l in layers:
        groups.setdefault(layer_input(l), []).append(l)
    return layers, groups


def _fold_table(graph):
    """{consumer path: producer module path or None}"""
    _, groups = _groups(graph)
    out = {}
    for x, ls in groups.items():
        fold = find_fold(graph, x, {l.node for l in ls})
        for l in ls:
            out[l.path] = module_path(fold.producer) if fold else None
    return out


def _ids_calib(example, n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = example[0]
    return [(torch.randint(0, 256, ids.shape, generator=g),) + tuple(example[1:]) for _ in range(n)]


class Mixed(torch.nn.Module):
    """Three shapes of path: LayerNorm without affine -> fc1 -> ReLU -> fc2 (both foldable),
    GELU -> fc3 (not channel-linear), and a normed value that also feeds a residual."""

    def __init__(self, d=64):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d, elementwise_affine=False)
        self.fc1, self.fc2, self.fc3 = (torch.nn.Linear(d, d) for _ in range(3))
        self.ln2 = torch.nn.LayerNorm(d)
        self.fc4 = torch.nn.Linear(d, d)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(self.ln(x))))
        h = self.fc3(torch.nn.functional.gelu(h))
        n = self.ln2(h)
        return self.fc4(n) + n


@pytest.fixture(scope="module")
def llama():
    model, example = hf_llama(seq=16)
    return capture(model, example), example


@pytest.fixture(scope="module")
def bert():
    model, example = hf_bert(seq=16)
    return capture(model, example), example


@pytest.fixture(scope="module")
def gpt():
    model, example = tiny_gpt(n_layer=1, seq=16)
    return capture(model, example), example


# ------------------------------------------------------------------------------- structure
def test_folds_only_where_exact(llama, bert, gpt):
    b = "model.model.layers.0."
    assert {k: v for k, v in _fold_table(llama[0]).items() if k.startswith(b)} == {
        b + "self_attn.q_proj": b + "input_layernorm", b + "self_attn.k_proj": b + "input_layernorm",
        b + "self_attn.v_proj": b + "input_layernorm", b + "self_attn.o_proj": b + "self_attn.v_proj",
        b + "mlp.gate_proj": b + "post_attention_layernorm",
        b + "mlp.up_proj": b + "post_attention_layernorm", b + "mlp.down_proj": b + "mlp.up_proj"}
    assert _fold_table(llama[0])["model.lm_head"] == "model.model.norm"
    # BERT is post-LN: the norm's output also feeds the residual, so only value -> dense folds
    b = "model.encoder.layer.0."
    assert {k: v for k, v in _fold_table(bert[0]).items() if k.startswith(b)} == {
        b + "attention.self.query": None, b + "attention.self.key": None,
        b + "attention.self.value": None, b + "attention.output.dense": b + "attention.self.value",
        b + "intermediate.dense": None, b + "output.dense": None}
    assert _fold_table(gpt[0]) == {"blocks.0.attn.qkv": "blocks.0.ln1",
                                   "blocks.0.attn.proj": "blocks.0.attn.qkv",
                                   "blocks.0.mlp.fc": "blocks.0.ln2", "blocks.0.mlp.proj": None}
    mixed = capture(Mixed().eval(), (torch.randn(2, 8, 64),))
    assert _fold_table(mixed) == {"fc1": "ln", "fc2": "fc1", "fc3": None, "fc4": None}


@pytest.mark.parametrize("name", ["llama", "bert", "gpt", "mixed"])
def test_any_fold_is_exact_for_any_scale(name, llama, bert, gpt):
    """Fold random positive scales into every foldable group: same function (fp32 rounding)."""
    if name == "mixed":
        graph, example = capture(Mixed().eval(), (torch.randn(2, 8, 64),)), (torch.randn(2, 8, 64),)
    else:
        graph, example = {"llama": llama, "bert": bert, "gpt": gpt}[name]
    g = graph.clone()
    _, groups = _groups(g)
    gen = torch.Generator().manual_seed(3)
    folded = 0
    for x, ls in groups.items():
        fold = find_fold(g, x, {l.node for l in ls})
        if fold is None:
            continue
        # one value per producer channel (GQA: o_proj channels reading one kv channel share it)
        s = torch.exp(torch.randn(fold.n_channels, generator=gen))[fold.channel]
        apply_fold(g, fold, s)
        for l in ls:
            g.set_attr(l.weight_node, g.attr(l.weight_node) * s)
        folded += 1
    g.gm.recompile()
    assert folded >= 2
    inputs = example if name != "mixed" else (torch.randn(2, 8, 64),)
    ref, out = graph(*inputs)[0], g(*inputs)[0]
    assert (out - ref).abs().max() <= 2e-5 * ref.abs().max()
    changed = sum(not torch.equal(a, b) for a, b in zip(graph.gm.state_dict().values(),
                                                         g.gm.state_dict().values()))
    assert changed >= 2 * folded   # the folds did rescale weights


def test_fused_qkv_fold_touches_only_the_value_rows(gpt):
    g = gpt[0].clone()
    _, groups = _groups(g)
    x, ls = next((x, ls) for x, ls in groups.items() if ls[0].path == "blocks.0.attn.proj")
    fold = find_fold(g, x, {ls[0].node})
    before = g.attr("blocks.0.attn.qkv.weight").clone()
    apply_fold(g, fold, torch.full((128,), 2.0))
    after = g.attr("blocks.0.attn.qkv.weight")
    assert torch.equal(after[:256], before[:256])                      # q and k rows
    torch.testing.assert_close(after[256:], before[256:] / 2)          # v rows


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_awq_scaling_before_rounding_keeps_the_function(name, llama, bert):
    graph, example = {"llama": llama, "bert": bert}[name]
    g = graph.clone()
    layers, groups = _groups(g)
    res = awq_scale(g, layers, _ids_calib(example, 4, 1), 3, 32, clip=False, input_mul="always")
    infos = res.info
    assert len(infos) == len(layers)
    for ls in groups.values():   # layers on one input share one scale and one decision
        assert len({(infos[l.param]["alpha"], infos[l.param]["folded_into"]) for l in ls}) == 1
        assert all(torch.equal(res.scales[l.param], res.scales[ls[0].param]) for l in ls)
    scaled = [i for i in infos.values() if i["alpha"] > 0]
    assert scaled and all(i["group_error"] <= i["group_error_unscaled"] for i in infos.values())
    if name == "bert":   # unfoldable groups got an explicit mul that keeps provenance
        muls = [n for n in g.call_nodes() if n.meta.get("gradrewrite", {}).get("awq")]
        assert muls and all(n.target == aten.mul.Tensor and n.meta.get("nn_module_stack")
                            and "val" in n.meta for n in muls)
        assert {i["folded_into"] for i in scaled} >= {"input-mul"}
    for inputs in _ids_calib(example, 3, 50):
        ref, out = graph(*inputs)[0], g(*inputs)[0]
        assert (out - ref).abs().max() <= 2e-5 * ref.abs().max()


# ------------------------------------------------------------------------------- numerics
class OutlierChannels(torch.nn.Module):
    """x -> LayerNorm whose weight makes 4 of 128 channels ~25x larger -> Linear(128, 128)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ln = torch.nn.LayerNorm(128)
        self.fc = torch.nn.Linear(128, 128)
        with torch.no_grad():
            self.ln.weight.copy_(1 + 0.1 * torch.randn(128, generator=g))
            self.ln.weight[[3, 40, 77, 100]] *= 25
            self.fc.weight.copy_(torch.randn(128, 128, generator=g) / 128 ** 0.5)

    def forward(self, x):
        return self.fc(self.ln(x))


def _xs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 128, generator=g) * 2 + 1,) for _ in range(n)]


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_beats_rtn_on_held_out_inputs_with_outlier_channels(bits):
    model = OutlierChannels().eval()
    graph = capture(model, _xs(1, 0)[0])
    calib, held = _xs(16, 1), _xs(8, 99)
    errs, reports = {}, {}
    for method in ("rtn", "awq"):
        q = graph.clone()
        res = run_pipeline(q, f"quantize(mode=weight-only,bits={bits},group=32,method={method})",
                           ctx=PassContext(calibration=calib))
        reports[method] = res.records[-1].report
        with torch.no_grad():
            num = sum(float((q(*x)[0] - model(*x)).norm() ** 2) for x in held)
            den = sum(float(model(*x).norm() ** 2) for x in held)
        errs[method] = (num / den) ** 0.5
    print(f"{bits}-bit g32 held-out rel. error rtn {errs['rtn']:.4f} awq {errs['awq']:.4f}")
    assert errs["awq"] < 0.8 * errs["rtn"], errs
    awq = reports["awq"]["layers"][0]["awq"]
    assert awq["alpha"] > 0 and awq["folded_into"] == "ln" and reports["awq"]["method"] == "awq"
    assert reports["awq"]["bits_per_weight"] == reports["rtn"]["bits_per_weight"]


def test_input_mul_where_nothing_folds_and_its_decision():
    """The input itself has outlier channels (a graph input: nothing before it to fold into)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 64).eval()
    scale = torch.ones(128)
    scale[[5, 60]] = 30.0
    calib = [(torch.randn(16, 128) * scale,) for _ in range(8)]
    held = [(torch.randn(16, 128) * scale,) for _ in range(4)]
    graph = capture(model, calib[0])
    out = {}
    for opt in ("auto", "never"):
        q = graph.clone()
        res = run_pipeline(q, f"quantize(mode=weight-only,bits=3,group=32,method=awq,input_mul={opt})",
                           ctx=PassContext(calibration=calib))
        info = res.records[-1].report["layers"][0]["awq"]
        with torch.no_grad():
            err = sum(float((q(*x)[0] - model(*x)).norm()) for x in held)
        out[opt] = (info, err, sum(n.target == aten.mul.Tensor for n in q.call_nodes()))
    (auto, err_auto, muls_auto), (never, err_never, muls_never) = out["auto"], out["never"]
    assert auto["folded_into"] == "input-mul" and muls_auto == 1 and auto["alpha"] > 0
    assert never["folded_into"] is None and never["foldable"] is False and muls_never == 0
    assert never["alpha"] == 0 and never["alpha_searched"] == auto["alpha"]
    assert err_auto < 0.8 * err_never


def test_awq_gptq_scales_then_compensates(llama):
    graph, example = llama
    calib = _ids_calib(example, 4, 1)
    q = graph.clone()
    report = run_pipeline(q, "quantize(mode=weight-only,bits=3,group=32,method=awq-gptq)",
                          ctx=PassContext(calibration=calib)).records[-1].report
    layer = report["layers"][0]
    assert report["method"] == "awq-gptq" and "gptq" in layer and "awq" in layer
    assert "clip_mean_range" not in layer["awq"]   # GPTQ sets its own ranges
    assert all(l["gptq"]["hessian_error"] < l["gptq"]["hessian_error_rtn"] for l in report["layers"])


def test_fake_quantize_is_what_storage_dequantizes():
    g = torch.Generator().manual_seed(0)
    for bits, (n, k), group in ((3, (24, 100), 32), (4, (16, 256), 128), (2, (8, 64), 16)):
        w = torch.randn(n, k, generator=g)
        mask = torch.rand(n, k, generator=g) < 0.02
        for m in (None, mask):
            assert torch.equal(fake_quantize(w, bits, group, m),
                               quantize_groupwise(w, bits, group, m).dequantized())


def test_outliers_stay_out_of_the_searched_ranges():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g) * 0.1
    w[5, 3] = 40.0
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[5, 3] = True
    x = torch.randn(64, 64, generator=g)
    clipped, factor = search_clip(w, x, 3, 32, mask)
    assert clipped[5, 3] == 40.0 and factor <= 1.0
    assert clipped[5, :32][~mask[5, :32]].abs().max() <= w[5, :32][~mask[5, :32]].abs().max()
    # through the pass: outliers kept exact, the group range without them
    model = OutlierChannels().eval()
    graph = capture(model, _xs(1, 0)[0])
    with torch.no_grad():
        graph.attr("fc.weight")[7, 9] = 50.0
    rep = run_pipeline(graph, "quantize(mode=weight-only,bits=4,group=32,method=awq,outliers=0.01,"
                              "criterion=magnitude)", ctx=PassContext(calibration=_xs(4, 1)))
    layer = rep.records[-1].report["layers"][0]
    assert layer["outliers"] == round(0.01 * 128 * 128)
    node = next(n for n in graph.call_nodes() if "quantized" in n.meta.get("gradrewrite", {}))
    scales = graph.attr(node.args[2])
    args = [graph.attr(a) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a for a in node.args]
    value = float(groupwise_weight(*args[1:4], *args[5:11])[7, 9])   # 50 * its channel's s
    assert abs(value) > 5 and float(scales[7, 0]) * 15 < abs(value) / 4   # not in the group range
    assert value == float(torch.tensor(value).half())                    # stored in fp16


# ------------------------------------------------------------------------------- options
def test_options_and_calibration_are_checked(gpt):
    graph, _ = gpt
    for options, needle in [("mode=static,method=awq", "method=awq is for weight-only"),
                            ("mode=static,method=awq-gptq", "method=awq-gptq is for weight-only"),
                            ("mode=weight-only,bits=4,method=awq,input_mul=sometimes", "unknown input_mul"),
                            ("mode=weight-only,bits=4,method=awq-gptq,damp=0", "damp=0")]:
        with pytest.raises(ConfigError, match=needle) as info:
            run_pipeline(graph.clone(), f"quantize({options})")
        assert "\n" not in str(info.value)
    for method in ("awq", "awq-gptq"):
        with pytest.raises(InputError, match=f"method={method} needs calibration data") as info:
            run_pipeline(graph.clone(), f"quantize(mode=weight-only,bits=4,method={method})")
        assert "\n" not in str(info.value)


def test_progress_per_layer_group(gpt):
    graph, example = gpt
    seen = []
    run_pipeline(graph.clone(), "quantize(mode=weight-only,bits=4,group=32,method=awq)",
                 ctx=PassContext(calibration=_ids_calib(example, 2, 1),
                                 progress=lambda d, i, t: seen.append((d, i, t))))
    search = [(i, t) for d, i, t in seen if d.startswith("awq: scale search")]
    assert search[0] == (0, 4) and search[-1] == (4, 4) and len(search) == 5
    assert any(d.startswith("awq: observing") for d, _, _ in seen)


def test_ort_artifact_equals_the_graph(tmp_path):
    pytest.importorskip("onnxruntime")
    from gradrewrite.compiler import Artifact, CompileOptions, compile_graph

    model, (ids,) = tiny_gpt(vocab=128, d_model=64, n_layer=1, n_head=2, seq=16, tie_weights=False)
    graph = capture(model, (ids,))
    calib = [graph.random_inputs(i) for i in range(4)]
    passes = "quantize(mode=weight-only,bits=4,group=32,method=awq,input_mul=always)"
    q = graph.clone()
    report = run_pipeline(q, passes, ctx=PassContext(calibration=calib)).records[-1].report
    where = {l["path"]: l["awq"]["folded_into"] for l in report["layers"]}
    assert where["blocks.0.mlp.proj"] == "input-mul" and where["blocks.0.mlp.fc"] == "blocks.0.ln2"
    compile_graph(graph.clone(), tmp_path / "ort", CompileOptions(passes=passes, backend="ort",
                                                                  calibration=calib, latency_runs=0))
    out = Artifact(tmp_path / "ort")(ids)[0]
    np.testing.assert_allclose(out, q(ids)[0].numpy(), rtol=1e-4, atol=1e-4)
