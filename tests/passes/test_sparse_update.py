"""sparse-update: pruned backward, partial channels, reordering, budget search."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from gradrewrite.compiler import run_pipeline
from gradrewrite.errors import GradrewriteError
from gradrewrite.rewrite.graph import module_path
from gradrewrite.rewrite.memory_plan import memory_report
from gradrewrite.rewrite.train_step import capture_train_step, role


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.pw2 = nn.Conv2d(16, 16, 1, bias=False)
        self.head = nn.Linear(16, 6)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.pw2(torch.relu(self.pw(x))))
        return self.head(x.mean((2, 3)))


LR = 0.1


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 12, 12, generator=g), torch.randint(0, 6, (2,), generator=g)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Net()


@pytest.fixture(scope="module")
def full(model):
    return capture_train_step(model, "cross_entropy", batch(), lr=LR)


def sparse(full, spec):
    g = full.clone()
    rec = run_pipeline(g, spec, verify=False).records[-1]
    return g, rec.report


def autograd_grads(model, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))


@pytest.mark.parametrize("reorder", [False, True])
def test_updated_params_match_autograd_and_frozen_untouched(model, full, reorder):
    g, rep = sparse(full, f"sparse-update(bias_last=2, weights='pw:1/4,head:1/2', reorder={reorder})")
    ts = g.meta["train_step"]
    trained = [p for p, i in ts["params"].items() if i["trained"]]
    assert sorted(trained) == ["head.bias", "head.weight", "pw.bias", "pw.weight"]
    x, y = batch(3)
    out = g(x, y)
    grads = autograd_grads(model, x, y)
    params = dict(model.named_parameters())
    for what, new in zip(ts["outputs"][1:], out[1:]):
        p = params[what].detach()
        rows = ts["params"][what]["rows"] or p.shape[0]
        expected = p.clone()
        expected[:rows] -= LR * grads[what][:rows]   # only the chosen channels move
        assert torch.allclose(new, expected, rtol=1e-5, atol=1e-6), what
    assert ts["params"]["pw.weight"]["rows"] == math.ceil(16 / 4)
    assert ts["params"]["head.weight"]["rows"] == 3
    # frozen parameters are not outputs and the graph's own weights are unchanged
    for name in ("stem.weight", "dw.weight", "pw2.weight"):
        assert name not in ts["outputs"]
        assert torch.equal(g.attr(name), params[name].detach())


def test_pruned_structure(full):
    g, rep = sparse(full, "sparse-update(bias_last=1, weights='pw:1/2')")
    back = [n for n in g.call_nodes() if role(n) == "backward"]
    paths = {module_path(n) for n in back}
    # the backward stops at pw: nothing below it, no gradient for frozen weights
    assert not paths & {"stem", "dw"}
    assert rep["backward_stops_at"] == "pw"
    assert not any(n.meta.get("param") in ("stem.weight", "dw.weight", "pw2.weight", "pw.bias")
                   for n in g.call_nodes())
    names = {n.name for n in g.graph.nodes}
    assert "pw_weight_grad_rows8" in names and "stem_weight_grad" not in names
    cbs = [n for n in back if n.target == torch.ops.aten.convolution_backward.default]
    pw_cb = [n for n in cbs if module_path(n) == "pw"]
    assert pw_cb and all(n.args[10][0] is False for n in pw_cb)   # no input grad below pw
    assert rep["nodes"]["after"] < rep["nodes"]["before"]


def test_reordering_moves_updates_and_cuts_memory(full):
    spec = "sparse-update(bias_last=3, weights='pw:1,pw2:1,head:1', reorder={})"
    late, _ = sparse(full, spec.format("false"))
    early, rep = sparse(full, spec.format("true"))
    assert rep["reordered_ops"] > 0
    order = {n.name: i for i, n in enumerate(early.graph.nodes)}
    for path, info in early.meta["train_step"]["params"].items():
        if info["trained"]:
            upd = next(n for n in early.graph.nodes if n.name == info["update"])
            grad = next(n for n in early.graph.nodes if n.name == info["grad"])
            assert order[upd.name] - order[grad.name] <= 3, path
    assert memory_report(early)["arena_bytes"] <= memory_report(late)["arena_bytes"]
    # same numbers either way
    x, y = batch(5)
    for a, b in zip(late(x, y), early(x, y)):
        assert torch.allclose(a, b)


def test_depthwise_partial_channels(model, full):
    g, _ = sparse(full, "sparse-update(weights='dw:1/2')")
    x, y = batch(2)
    out = g(x, y)
    grads = autograd_grads(model, x, y)
    exp = model.dw.weight.detach().clone()
    exp[:4] -= LR * grads["dw.weight"][:4]
    assert torch.allclose(out[1], exp, rtol=1e-5, atol=1e-6)


def test_memory_split_and_plan(full):
    g, rep = sparse(full, "sparse-update(bias_last=2)")
    mem = rep["memory"]
    assert mem["trained_weights_bytes"] == (6 + 16) * 4
    assert mem["sram_bytes"] == mem["arena_bytes"] + mem["trained_weights_bytes"] + mem["inputs_bytes"]
    assert mem["arena_bytes"] >= mem["peak_live_bytes"]
    assert memory_report(full)["arena_bytes"] > mem["arena_bytes"]


def test_budget_search(full):
    small = memory_report(sparse(full, "sparse-update(bias_last=1)")[0])["sram_bytes"]
    budget = small + 6000
    g, rep = sparse(full, f"sparse-update(budget='{budget}')")
    assert rep["memory"]["sram_bytes"] <= budget
    assert rep["contribution_scores"]["bias"] and rep["search_trials"]
    assert rep["scheme"].startswith("bias_last=")
    with pytest.raises(GradrewriteError, match="too small.*smallest"):
        sparse(full, f"sparse-update(budget='{small - 64}')")


@pytest.mark.parametrize("spec,needle", [
    ("sparse-update(weights='nope:1')", "no conv/linear layer 'nope'"),
    ("sparse-update(biases='pw2')", "has no bias"),
    ("sparse-update(bias_last=9)", "only 4 layers have a bias"),
    ("sparse-update(weights='-9:1')", "does not exist"),
    ("sparse-update(weights='pw:3/2')", "outside (0, 1]"),
    ("sparse-update()", "updates nothing"),
])
def test_bad_schemes(full, spec, needle):
    with pytest.raises(GradrewriteError, match=None) as exc:
        sparse(full, spec)
    assert needle in str(exc.value)


def test_needs_training_graph():
    from gradrewrite.rewrite.capture import capture
    g = capture(Net(), (batch()[0],))
    with pytest.raises(GradrewriteError, match="training-step"):
        run_pipeline(g, "sparse-update(bias_last=1)", verify=False)


def test_budget_search_scores_on_calibration_batches(full):
    from gradrewrite.rewrite.registry import PassContext

    calib = [batch(s) for s in range(4)]
    small = memory_report(sparse(full, "sparse-update(bias_last=1)")[0])["sram_bytes"]
    g = full.clone()
    spec = f"sparse-update(budget='{small + 6000}')"
    rep = run_pipeline(g, spec, verify=False, ctx=PassContext(calibration=calib)).records[-1].report
    assert "4 batches" in rep["score_proxy"]
    assert rep["scheme_score"] > 0
