"""torch.compile(model, backend="gradrewrite"): every executor matches eager; failures fall back."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import gradrewrite.dynamo  # noqa: F401  (registers the backend)
from tests.small_models import Eig, Mlp


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class Branchy(nn.Module):
    """A data-dependent Python branch: dynamo breaks the graph in two."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


def _warm(model, shape):
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(shape, generator=g) * 2 + 0.5)
    return model.eval()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _check(model, x, options, rtol=1e-5):
    compiled = torch.compile(model, backend="gradrewrite", options=options, dynamic=False)
    with torch.no_grad():
        ref = model(x)
        got = compiled(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= rtol * (1 + ref.abs().max().item())
    return compiled


CASES = [("torch", {}), ("ort", {}), ("tvm", {"backend_options": {"tune_trials": 0, "target": "llvm"}})]


@pytest.mark.parametrize("executor,extra", CASES, ids=[c[0] for c in CASES])
def test_executors_match_eager(executor, extra, caplog):
    torch.manual_seed(0)
    opts = {"passes": "fold-bn,dce", "executor": executor, **extra}
    with caplog.at_level(logging.WARNING, logger="gradrewrite.dynamo"):
        _check(_warm(Cnn(), (2, 3, 8, 8)), torch.randn(2, 3, 8, 8), opts)
        _check(_warm(Mlp(), (4, 16)), torch.randn(4, 16), opts)
    assert not [r for r in caplog.records if r.name == "gradrewrite.dynamo"], caplog.text


@pytest.mark.slow
def test_inductor_executor(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="gradrewrite.dynamo"):
        _check(_warm(Cnn(), (2, 3, 8, 8)), torch.randn(2, 3, 8, 8), {"passes": "fold-bn,dce", "executor": "inductor"})
        _check(_warm(Mlp(), (4, 16)), torch.randn(4, 16), {"passes": "fold-bn,dce", "executor": "inductor"})
    assert not [r for r in caplog.records if r.name == "gradrewrite.dynamo"], caplog.text


def _spy_compile(monkeypatch):
    from gradrewrite import dynamo

    seen = []
    real = dynamo._compile

    def spy(gm, inputs, opts):
        seen.append(gm)
        return real(gm, inputs, opts)

    monkeypatch.setattr(dynamo, "_compile", spy)
    return seen


def test_fold_bn_really_runs(monkeypatch):
    """The torch executor runs the rewritten module: no batch norm is left in it."""
    import gradrewrite.compiler as compiler

    seen = _spy_compile(monkeypatch)
    captured = {}
    real_run = compiler.run_pipeline

    def run_spy(graph, *a, **k):
        res = real_run(graph, *a, **k)
        captured["ops"] = graph.op_histogram()
        return res

    monkeypatch.setattr(compiler, "run_pipeline", run_spy)
    _check(_warm(Cnn(), (2, 3, 8, 8)), torch.randn(2, 3, 8, 8), {"passes": "fold-bn,dce"})
    assert len(seen) == 1 and captured["ops"] and not any("batch_norm" in op for op in captured["ops"])


@pytest.mark.parametrize("executor", ["torch", "ort"])
def test_graph_break(executor, caplog, monkeypatch):
    seen = _spy_compile(monkeypatch)
    torch.manual_seed(0)
    model = Branchy().eval()
    with caplog.at_level(logging.WARNING, logger="gradrewrite.dynamo"):
        compiled = _check(model, torch.randn(2, 8), {"executor": executor})
        with torch.no_grad():
            for _ in range(2):   # both sides of the branch
                x = torch.randn(2, 8) * 3
                assert torch.allclose(compiled(x), model(x), atol=1e-5)
    assert len(seen) >= 2  # the branch split the forward into subgraphs, each compiled
    assert not [r for r in caplog.records if r.name == "gradrewrite.dynamo"], caplog.text


def test_unsupported_subgraph_falls_back_with_one_log_line(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="gradrewrite.dynamo"):
        _check(Eig().eval(), torch.randn(2, 4, 4), {"executor": "ort"})
    records = [r for r in caplog.records if r.name == "gradrewrite.dynamo"]
    assert len(records) == 1 and "eagerly" in records[0].getMessage() and "ort" in records[0].getMessage()


def test_autograd_falls_back_to_eager(caplog):
    torch.manual_seed(0)
    model = Mlp().eval()
    compiled = torch.compile(model, backend="gradrewrite", options={"executor": "ort"}, dynamic=False)
    x = torch.randn(4, 16)
    with caplog.at_level(logging.WARNING, logger="gradrewrite.dynamo"):
        y = compiled(x)
    y.sum().backward()
    assert model.fc1.weight.grad is not None
    assert "autograd" in caplog.text


@pytest.mark.parametrize("options,match", [({"executor": "xla"}, "valid executors: torch, inductor, ort, tvm"),
                                           ({"pases": "dce"}, "valid options: passes, executor"),
                                           ({"passes": "no-such-pass"}, "no-such-pass")])
def test_bad_options_are_errors(options, match):
    compiled = torch.compile(Mlp().eval(), backend="gradrewrite", options=options)
    with torch.no_grad(), pytest.raises(Exception, match=match):
        compiled(torch.randn(4, 16))
