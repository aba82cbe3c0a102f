"""nm-sparsity: N:M structure per layer kind, skip rules, report numbers, numerics against
a hand-masked eager model, ORT export round trip, training modes, bad input, CLI."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradrewrite as gr
from gradrewrite.errors import ConfigError, GradrewriteError
from gradrewrite.passes.nm_sparsity import NMSparsity
from gradrewrite.rewrite.nm_masks import check_nm, nm_mask
from gradrewrite.rewrite.graph import module_path
from gradrewrite.rewrite.inspect import describe, render_table
from gradrewrite.rewrite.pipeline import build_passes, parse_pipeline
from gradrewrite.rewrite.registry import make_pass


class Net(nn.Module):
    """conv2d, depthwise conv, grouped conv (K=8), conv1d, linear, an odd linear (K=10)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),          # depthwise: K=1
            nn.Conv2d(16, 16, 1, groups=2),                       # grouped: K=8
        )
        self.seq = nn.Conv1d(16, 12, 3)
        self.fc = nn.Linear(12, 10)
        self.head = nn.Linear(10, 6)                              # K=10: 10 % 4 != 0

    def forward(self, x):
        x = self.features(x)                                      # [B, 16, 6, 6]
        x = self.seq(x.flatten(2)).mean(-1)                       # [B, 12]
        return self.head(torch.relu(self.fc(x)))


X = (torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0)),)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def graph(model):
    return gr.capture(model, X, source="Net")


def sparsify(graph, text="nm-sparsity(n=2,m=4)"):
    return gr.run_pipeline(graph, text).records[-1]


def weight(graph, name):
    return graph.attr(name).detach()


def masked_copy(model, layers, n, m, pad=False):
    """The eager model with each named layer's weight masked by hand."""
    ref = copy.deepcopy(model)
    for path in layers:
        mod = ref.get_submodule(path)
        kind = "linear" if isinstance(mod, nn.Linear) else "conv"
        with torch.no_grad():
            mod.weight.mul_(nm_mask(mod.weight, n, m, kind, pad=pad))
    return ref


SPARSE = ["features.0", "features.3", "seq", "fc"]
KINDS = {"features.0": "conv", "features.3": "conv", "seq": "conv", "fc": "linear"}


# ------------------------------------------------------------------------ structure
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4)])
def test_structure_every_group_keeps_n(graph, n, m):
    rec = sparsify(graph, f"nm-sparsity(n={n},m={m})")
    assert [l["path"] for l in rec.report["layers"]] == SPARSE
    for path in SPARSE:
        w = weight(graph, f"{path}.weight")
        assert check_nm(w != 0, n, m, KINDS[path]), path
        assert int((w != 0).sum()) == w.numel() * n // m
    # left dense
    assert bool((weight(graph, "features.2.weight") != 0).all())
    assert bool((weight(graph, "head.weight") != 0).all())


def test_conv_groups_run_along_input_channels(graph):
    sparsify(graph)
    w = weight(graph, "features.0.weight")                         # [16, 8, 3, 3]
    per_group = (w != 0).reshape(16, 2, 4, 3, 3).sum(2)            # groups of 4 input channels
    assert bool((per_group == 2).all())


def test_skip_reasons(graph):
    rec = sparsify(graph)
    skipped = {s["path"]: s["reason"] for s in rec.report["skipped"]}
    assert set(skipped) == {"features.2", "head"}
    assert "depthwise" in skipped["features.2"] and "K=1" in skipped["features.2"]
    assert "K=10" in skipped["head"] and "m=4" in skipped["head"]


def test_pad_odd_shapes(graph):
    rec = sparsify(graph, "nm-sparsity(n=2,m=4,on_indivisible=pad)")
    assert [l["path"] for l in rec.report["layers"]] == SPARSE + ["head"]
    head = rec.report["layers"][-1]
    assert head["padded"] is True
    w = weight(graph, "head.weight")                                # [6, 10]: groups 4, 4, 2
    assert check_nm(w != 0, 2, 4, "linear")
    assert (w != 0).sum(1).tolist() == [6] * 6                      # 2 + 2 + min(2, 2)
    # 1:4 on a conv with K=6: groups 4 + tail 2, one kept in each
    conv = nn.Sequential(nn.Conv2d(6, 4, 3), nn.Conv2d(4, 4, 1))
    g = gr.capture(conv.eval(), (torch.randn(1, 6, 5, 5),))
    sparsify(g, "nm-sparsity(n=1,m=4,on_indivisible=pad,select='path:0')")
    w0 = weight(g, "0.weight")
    assert check_nm(w0 != 0, 1, 4, "conv")
    assert bool(((w0 != 0).sum(1) == 2).all())                      # per output, kernel position


def test_shared_weight_skipped():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 4)

        def forward(self, x):
            return self.out(self.fc(self.fc(x)))

    g = gr.capture(Shared().eval(), (torch.randn(2, 8),))
    rec = sparsify(g)
    assert [l["path"] for l in rec.report["layers"]] == ["out"]
    assert {s["reason"] for s in rec.report["skipped"]} == {"weight shared with another layer"}
    assert bool((weight(g, "fc.weight") != 0).all())


def test_addmm_of_transposed_weight():
    class Addmm(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 8))
            self.b = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return torch.addmm(self.b, x, self.w.t())

    g = gr.capture(Addmm().eval(), (torch.randn(3, 8),))
    rec = sparsify(g)
    assert [(l["weight"], l["kind"]) for l in rec.report["layers"]] == [("w", "linear")]
    assert check_nm(weight(g, "w") != 0, 2, 4, "linear")
    with pytest.raises(ConfigError, match="addmm reads its weight through a transpose"):
        sparsify(gr.capture(Addmm().eval(), (torch.randn(3, 8),)), "nm-sparsity(mode=srste)")


def test_select_and_exclude(graph):
    rec = sparsify(graph, "nm-sparsity(select='path:features.*|fc', exclude='features.3')")
    assert [l["path"] for l in rec.report["layers"]] == ["features.0", "fc"]
    reasons = {s["path"]: s["reason"] for s in rec.report["skipped"]}
    assert reasons["features.3"] == "excluded by 'features.3'"
    assert bool((weight(graph, "features.3.weight") != 0).all())
    assert bool((weight(graph, "seq.weight") != 0).all())           # not selected at all
    assert "seq" not in reasons


def test_exclude_several_globs(graph):
    rec = sparsify(graph, "nm-sparsity(exclude='features.*|fc')")
    assert [l["path"] for l in rec.report["layers"]] == ["seq"]


def test_annotations_meta_and_inspect(graph):
    sparsify(graph)
    fc = next(n for n in graph.call_nodes() if module_path(n) == "fc")
    assert fc.meta["gradrewrite"] == {"sparsity": "2:4", "density": 0.5}
    head = next(n for n in graph.call_nodes() if module_path(n) == "head")
    assert "sparsity" not in head.meta.get("gradrewrite", {})
    rec = graph.meta["nm_sparsity"]["fc.weight"]
    assert (rec["n"], rec["m"], rec["kind"], rec["shape"]) == (2, 4, "linear", [10, 12])
    assert rec["mask"].dtype == torch.bool
    assert torch.equal(rec["mask"], weight(graph, "fc.weight") != 0)
    summary = graph.meta["export_metadata"]["nm_sparsity"]
    assert set(summary) == {f"{p}.weight" for p in SPARSE}
    json.dumps(summary)                                              # no tensors
    assert summary["features.0.weight"]["bits_per_weight"]["fp16"] == 9.0
    table = render_table(describe(graph))
    header = next(line for line in table.splitlines() if line.startswith("name"))
    assert header.rstrip().endswith("annotations")
    row = next(line for line in table.splitlines() if line.startswith(fc.name + " "))
    assert "sparsity=2:4 density=0.5" in row


def test_report_numbers(graph):
    report = sparsify(graph).report
    assert (report["mode"], report["n"], report["m"]) == ("oneshot", 2, 4)
    by = {l["path"]: l for l in report["layers"]}
    for layer in report["layers"]:
        assert layer["density"] == 0.5
        assert layer["bits_per_weight"]["fp32"] == (2 * 32 + 2 * 2) / 4 == 17.0
        assert layer["bits_per_weight"]["fp16"] == (2 * 16 + 2 * 2) / 4 == 9.0
    assert by["fc"]["bits_per_weight"]["int8"] == pytest.approx((2 * 8 + 2 * 2) / 4 + 32 / 12)
    assert by["features.0"]["bits_per_weight"]["int8"] == pytest.approx(5 + 32 / 8)
    assert by["features.0"]["shape"] == [16, 8, 3, 3] and by["features.0"]["kind"] == "conv"
    totals = report["totals"]
    numel = 16 * 8 * 9 + 16 * 8 + 12 * 16 * 3 + 10 * 12
    assert totals["sparsified_params"] == numel
    assert totals["density"] == 0.5
    assert totals["dense_bits_per_weight"] == {"fp32": 32.0, "fp16": 16.0, "int8": 8.0}
    assert totals["compressed_bits_per_weight"]["fp16"] == 9.0
    json.dumps(report)


def test_report_numbers_other_ratios(graph):
    report = sparsify(graph, "nm-sparsity(n=1,m=8,select='path:features.0|fc')").report
    # index bits for m=8: 3; fp16: (1*16 + 1*3) / 8
    assert report["layers"][0]["bits_per_weight"]["fp16"] == pytest.approx(19 / 8)
    assert report["totals"]["density"] == 0.125


# ------------------------------------------------------------------------ numerics
def test_numerics_match_hand_masked_model(model, graph):
    biases = {p: weight(graph, f"{p}.bias").clone() for p in SPARSE}
    sparsify(graph)
    ref = masked_copy(model, SPARSE, 2, 4)
    for seed in range(3):
        x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(seed)) * 2
        want = ref(x)
        got = graph(x)[0]
        assert (got - want).abs().max() <= 1e-5 * (1 + want.abs().max())   # fp32 rounding
    for p in SPARSE:
        assert torch.equal(weight(graph, f"{p}.bias"), biases[p])              # biases kept
    # the captured eager model is untouched
    assert bool((model.fc.weight != 0).all())


def test_verification_reports_but_does_not_fail(graph):
    rec = sparsify(graph)
    assert rec.verification is not None and rec.verification["relative_error"] > 1e-3


# ------------------------------------------------------------------------ export
def test_ort_round_trip(tmp_path, model, graph):
    import onnx
    from onnx import numpy_helper

    gr.run_pipeline(graph, "nm-sparsity(n=2,m=4)")
    art = gr.compile(graph, tmp_path / "out", passes=None, backend="ort")
    ref = masked_copy(model, SPARSE, 2, 4)
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(5))
    got = np.asarray(art(x.numpy())[0])
    want = ref(x).detach().numpy()
    assert np.abs(got - want).max() <= 1e-5 * (1 + np.abs(want).max())

    proto = onnx.load(str(tmp_path / "out" / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for path in SPARSE:
        w = torch.from_numpy(inits[f"{path}.weight"].copy())
        assert check_nm(w != 0, 2, 4, KINDS[path]), path
        assert torch.equal(w, weight(graph, f"{path}.weight"))     # exact zeros and values
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props["gradrewrite.nm_sparsity"])
    assert meta["fc.weight"]["n"] == 2 and meta["fc.weight"]["density"] == 0.5
    assert art.report["export_metadata"]["nm_sparsity"]["fc.weight"]["m"] == 4


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("options,needle", [
    ({"n": 4, "m": 4}, "n=4 must be smaller than m=4"),
    ({"n": 0, "m": 4}, "n=0"),
    ({"n": 1, "m": 1}, "m=1"),
    ({"mode": "magic"}, "unknown mode 'magic'"),
    ({"decay": "cosine"}, "unknown decay"),
    ({"gradient": "sideways"}, "unknown gradient"),
    ({"on_indivisible": "crop"}, "unknown on_indivisible"),
    ({"schedule": "7-8|2:4"}, "bad schedule stage '7-8'"),
    ({"n": 2, "m": 8, "schedule": "2:8|4:8"}, "not decreasing"),
    ({"n": 2, "m": 8, "schedule": "7:8|4:8"}, "does not end at 2:8"),
    ({"n": 2, "m": 8, "schedule": "4:8|4:8|2:8"}, "not decreasing"),
    ({"mode": "pgf-structure", "n": 1, "m": 8, "schedule": "7:8|4:8|2:8|1:8", "decay_steps": 2},
     "shorter than the 4 schedule stages"),
    ({"decay_steps": -1}, "decay_steps=-1 is negative"),
    ({"mask_interval": 0}, "mask_interval=0"),
])
def test_bad_options(options, needle):
    with pytest.raises(ConfigError) as err:
        make_pass("nm-sparsity", options)
    assert needle in str(err.value)
    assert err.value.hint


def test_pipeline_text_options():
    p = build_passes(parse_pipeline(
        "nm-sparsity(n=2,m=8,mode=pgf-structure,schedule='6:8|4:8|2:8',warmup_steps=10)"))[0]
    assert isinstance(p, NMSparsity) and p.schedule == "6:8|4:8|2:8" and p.warmup_steps == 10


def test_selector_matching_nothing(graph):
    with pytest.raises(GradrewriteError, match="matches no layer"):
        sparsify(graph, "nm-sparsity(select='path:nothing.*')")


def test_selector_without_conv_or_linear(graph):
    with pytest.raises(ConfigError, match="no conv or linear layer"):
        sparsify(graph, "nm-sparsity(select='op:relu')")


def test_no_eligible_layer_lists_reasons():
    dw = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 3, groups=4))
    g = gr.capture(dw.eval(), (torch.randn(1, 4, 8, 8),))
    with pytest.raises(ConfigError) as err:
        sparsify(g)
    text = str(err.value)
    assert "no layer is eligible for 2:4 sparsity" in text
    assert "0: depthwise conv: K=1" in text and "1: depthwise conv" in text
    assert "pass 'nm-sparsity'" in text


# ------------------------------------------------------------------------ training modes
def test_train_config_from_options():
    from gradrewrite.passes.nm_sparsity.training import NMTrainConfig

    p = make_pass("nm-sparsity", {"mode": "pgf-structure", "n": 2, "m": 8,
                                  "schedule": "7:8|4:8|2:8", "decay_steps": 300,
                                  "warmup_steps": 5, "mask_interval": 2})
    assert p.train_config() == NMTrainConfig(
        method="pgf-structure", n=2, m=8, schedule=((7, 8), (4, 8), (2, 8)), decay_steps=300,
        warmup_steps=5, mask_interval=2)
    p = make_pass("nm-sparsity", {"mode": "pgf-mask", "decay": "exp", "gradient": "chain-rule",
                                  "decay_rate": 0.01})
    cfg = p.train_config()
    assert (cfg.method, cfg.decay, cfg.gradient, cfg.decay_rate) == ("pgf-mask", "exp",
                                                                     "chain-rule", 0.01)


@pytest.mark.parametrize("mode", ["srste", "pgf-mask"])
def test_training_mode_installs_then_finalize_bakes(graph, mode):
    rec = gr.run_pipeline(graph, f"nm-sparsity(n=2,m=4,mode={mode})", verify=False).records[-1]
    assert hasattr(graph.gm, "nm_trainer")
    assert graph.meta["pending_training"] == "nm-sparsity"
    assert rec.report["mode"] == mode and [l["path"] for l in rec.report["layers"]] == SPARSE
    with pytest.raises(ConfigError, match="already has nm-sparsity training rewrites"):
        gr.run_pipeline(graph, "nm-sparsity", verify=False)

    rec = gr.run_pipeline(graph, "nm-finalize", verify=False).records[-1]
    assert not hasattr(graph.gm, "nm_trainer") and not graph.meta.get("pending_training")
    assert [l["path"] for l in rec.report["layers"]] == SPARSE
    for path in SPARSE:
        w = weight(graph, f"{path}.weight")
        assert check_nm(w != 0, 2, 4, KINDS[path]), path
        assert torch.equal(graph.meta["nm_sparsity"][f"{path}.weight"]["mask"], w != 0)
    assert rec.report["totals"]["density"] == 0.5
    fc = next(n for n in graph.call_nodes() if module_path(n) == "fc")
    assert fc.meta["gradrewrite"]["sparsity"] == "2:4"
    assert "fc.weight" in graph.meta["export_metadata"]["nm_sparsity"]


def test_train_steps_through_the_pass_then_finalize(graph):
    gr.run_pipeline(graph, "nm-sparsity(n=2,m=4,mode=srste,decay_steps=4,select='path:fc')")
    trainer = graph.gm.nm_trainer
    params = [p for p in graph.gm.parameters() if p.requires_grad]
    assert len(params) >= 1
    opt = torch.optim.SGD(params, lr=0.1)
    trainer.attach(opt)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(4, 8, 6, 6, generator=gen)
        opt.zero_grad()
        graph.gm(x).square().mean().backward()
        opt.step()
    assert trainer.t > 0
    rec = gr.run_pipeline(graph, "nm-finalize", verify=False).records[-1]
    assert [l["path"] for l in rec.report["layers"]] == ["fc"]
    w = weight(graph, "fc.weight")
    assert check_nm(w != 0, 2, 4, "linear")
    out = graph(X[0])[0]
    assert torch.isfinite(out).all()


def test_training_mode_pads_indivisible(graph):
    rec = gr.run_pipeline(graph, "nm-sparsity(mode=srste,on_indivisible=pad)",
                          verify=False).records[-1]
    assert [l["path"] for l in rec.report["layers"]] == SPARSE + ["head"]
    assert rec.report["layers"][-1]["padded"] is True
    gr.run_pipeline(graph, "nm-finalize", verify=False)
    assert check_nm(weight(graph, "head.weight") != 0, 2, 4, "linear")


def test_pgf_structure_schedule_with_other_group_sizes():
    # 8:64 ... 1:8 keeps density 1/8 while the structure narrows; K must divide every m
    mlp = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    g = gr.capture(mlp.eval(), (torch.randn(2, 64),))
    rec = gr.run_pipeline(g, "nm-sparsity(n=1,m=8,mode=pgf-structure,decay_steps=8,"
                             "schedule='8:64|4:32|2:16|1:8')", verify=False).records[-1]
    assert [l["path"] for l in rec.report["layers"]] == ["0"]
    assert rec.report["skipped"] == [
        {"path": "2", "reason": "K=16 is not a multiple of the schedule's m=64 "
                                "(on_indivisible=pad pads the last group)"}]
    assert g.gm.nm_trainer.cfg.schedule == ((8, 64), (4, 32), (2, 16), (1, 8))
    rec = gr.run_pipeline(g, "nm-finalize", verify=False).records[-1]
    assert (rec.report["n"], rec.report["m"], rec.report["totals"]["density"]) == (1, 8, 0.125)
    assert check_nm(weight(g, "0.weight") != 0, 1, 8, "linear")


def test_finalize_rewrites_installed_by_hand(graph):
    from gradrewrite.passes.nm_sparsity.training import (
        LayerRef, NMTrainConfig, insert_training_rewrites,
    )

    fc = next(n for n in graph.call_nodes() if module_path(n) == "fc")
    insert_training_rewrites(graph, [LayerRef("fc.weight", fc, fc.args[1], "linear")],
                             NMTrainConfig(method="pgf-mask", n=1, m=4))
    rec = gr.run_pipeline(graph, "nm-finalize", verify=False).records[-1]
    assert (rec.report["mode"], rec.report["n"], rec.report["m"]) == ("pgf-mask", 1, 4)
    assert [l["path"] for l in rec.report["layers"]] == ["fc"]
    assert check_nm(weight(graph, "fc.weight") != 0, 1, 4, "linear")


def test_finalize_without_training(graph):
    with pytest.raises(ConfigError, match="nothing to finalize") as err:
        gr.run_pipeline(graph, "nm-finalize")
    assert "training mode" in str(err.value)


# ------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_cli_compile_end_to_end(tmp_path, model):
    from tests.cli.conftest import run_cli

    pt2 = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(model, X), str(pt2))
    out = tmp_path / "out"
    run_cli("compile", pt2, "-p", "nm-sparsity(n=2,m=4,exclude='fc')", "-b", "ort", "-o", out,
            check=True)
    report = json.loads((out / "report.json").read_text())
    (nm,) = [p for p in report["passes"] if p["name"] == "nm-sparsity"]
    assert nm["options"]["n"] == 2 and nm["options"]["exclude"] == "fc"
    assert [l["path"] for l in nm["report"]["layers"]] == ["features.0", "features.3", "seq"]
    assert {s["path"] for s in nm["report"]["skipped"]} == {"features.2", "fc", "head"}
    assert nm["report"]["totals"]["density"] == 0.5
    assert set(report["export_metadata"]["nm_sparsity"]) == {
        "features.0.weight", "features.3.weight", "seq.weight"}
    assert report["verification"]["inputs_compared"] >= 1


# ------------------------------------------------------------------------ GPU 2:4 path
def test_semi_structured_without_cuda_reports_unavailable(graph, monkeypatch):
    from gradrewrite.passes.nm_sparsity.semi_structured import to_semi_structured

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sparsify(graph)
    assert to_semi_structured(graph) == {"available": False, "reason": "no CUDA device"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_semi_structured_on_gpu():
    from gradrewrite.passes.nm_sparsity.semi_structured import to_semi_structured

    mlp = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 24))  # 24 rows: too few
    x = torch.randn(64, 256)
    g = gr.capture(mlp.eval(), (x,))
    sparsify(g, "nm-sparsity(n=2,m=4)")
    g.gm.to("cuda", torch.float16)
    dense = g(x.cuda().half())[0]
    report = to_semi_structured(g, min_speedup=0.0, iters=5)
    if not report["available"]:
        pytest.skip(report["reason"])
    by = {l["path"]: l for l in report["layers"]}
    assert by["0"]["eligible"] and by["0"]["converted"], by["0"]
    assert by["0"]["dense_ms"] > 0 and by["0"]["sparse_ms"] > 0
    assert not by["2"]["eligible"] and "not a multiple" in by["2"]["reason"]
    got = g(x.cuda().half())[0]
    torch.testing.assert_close(got.float(), dense.float(), rtol=2e-2, atol=2e-2)


def test_artifact_ships_exact_masks(tmp_path):
    """The artifact holds the masks themselves, not just zeros: they match the pass's masks."""
    import gradrewrite as gr
    from gradrewrite.passes.nm_sparsity import MASK_FILE, load_masks
    from gradrewrite.rewrite.nm_masks import check_nm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 8)).eval()
    g = gr.capture(model, (torch.randn(1, 8, 6, 6),))
    gr.run_pipeline(g, "nm-sparsity(n=1,m=4)")
    expected = {k: v["mask"] for k, v in g.meta["nm_sparsity"].items()}
    for backend in ("torch", "ort"):
        art = gr.compile(g, tmp_path / backend, backend=backend)
        assert MASK_FILE in art.report["artifact"]["files"] and MASK_FILE in art.manifest["outputs"]
        masks = load_masks(str(tmp_path / backend / MASK_FILE))
        assert set(masks) == {"0.weight", "3.weight"}
        for key, mask in masks.items():
            assert torch.equal(mask, expected[key])
        assert check_nm(masks["0.weight"], 1, 4, "conv") and check_nm(masks["3.weight"], 1, 4, "linear")
