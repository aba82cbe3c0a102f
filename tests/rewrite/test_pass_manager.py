"""Pass manager: instruments, property checks, errors that name the passes."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from gradrewrite.errors import GradrewriteError, PassError, VerificationError
from gradrewrite.rewrite.pass_manager import DumpGraphs, Instrument, PassManager, VerifyEachPass
from gradrewrite.rewrite.pipeline import build_passes, parse_pipeline
from gradrewrite.rewrite.registry import PassResult, register_pass


@register_pass("test-break-numerics")
@dataclass(frozen=True)
class BreakNumerics:
    """Scale the first conv weight by 2 (wrong on purpose)."""
    exact = True

    def run(self, graph, ctx):
        node = next(n for n in graph.nodes if n.op == "get_attr")
        graph.set_attr(node, graph.attr(node) * 2)
        return PassResult(True, {})


@register_pass("test-crash")
@dataclass(frozen=True)
class Crash:
    """Raise a bug-like exception."""

    def run(self, graph, ctx):
        raise KeyError("boom")


@register_pass("test-needs-no-bn", requires=("no-batch-norm",))
@dataclass(frozen=True)
class NeedsNoBn:
    """Requires batch norm to be gone."""

    def run(self, graph, ctx):
        return PassResult(False, {})


def run(graph, text, instruments=()):
    return PassManager(build_passes(parse_pipeline(text)), instruments).run(graph)


def test_records_timing_and_nodes(convbn_graph):
    res = run(convbn_graph, "fold-bn,dce", [VerifyEachPass()])
    fold, dce = res.records
    assert fold.name == "fold-bn" and fold.seconds > 0 and fold.nodes_before - fold.nodes_after == 3
    assert fold.verification["relative_error"] < 1e-5
    assert dce.changed is False


def test_verification_catches_wrong_pass(convbn_graph):
    with pytest.raises(VerificationError, match="pass 'test-break-numerics' \\(after fold-bn\\)"):
        run(convbn_graph, "fold-bn,test-break-numerics", [VerifyEachPass()])


def test_crash_names_pass_and_history(convbn_graph):
    with pytest.raises(PassError) as e:
        run(convbn_graph, "dce,fold-bn,test-crash")
    assert e.value.pass_name == "test-crash" and e.value.ran_before == ("dce", "fold-bn")
    assert "KeyError" in str(e.value) and "after dce, fold-bn" in str(e.value)


def test_requires_checked(convbn_graph):
    with pytest.raises(GradrewriteError, match="test-needs-no-bn.*first pass.*'no-batch-norm'"):
        run(convbn_graph, "test-needs-no-bn")
    run(convbn_graph, "fold-bn")  # shared_bn stays (its conv output is reused) -> still fails
    with pytest.raises(GradrewriteError, match="shared_bn"):
        run(convbn_graph, "test-needs-no-bn")


def test_eval_mode_required_by_fold_bn(convbn_model):
    from gradrewrite.rewrite.graph import Graph

    x = (torch.randn(2, 3, 8, 8),)
    ep = torch.export.export(convbn_model.train(), x)   # e.g. a .pt2 saved in train mode
    convbn_model.eval()
    g = Graph.from_exported_program(ep, x)
    with pytest.raises(GradrewriteError, match="eval-mode.*model.eval"):
        run(g, "fold-bn")


def test_dump_graphs(tmp_path, convbn_graph):
    run(convbn_graph, "fold-bn,dce", [DumpGraphs(tmp_path)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-input.txt", "01-fold-bn.txt", "02-dce.txt"]
    assert "aten.batch_norm" in (tmp_path / "00-input.txt").read_text()
    assert (tmp_path / "01-fold-bn.txt").read_text().count("aten.batch_norm") == 1


def test_custom_instrument_order(convbn_graph):
    events = []

    class Log(Instrument):
        def enter_pipeline(self, graph, passes): events.append("enter")
        def before_pass(self, graph, p, record): events.append(f"before {record.name}")
        def after_pass(self, graph, p, record): events.append(f"after {record.name}")
        def exit_pipeline(self, graph, records): events.append("exit")

    run(convbn_graph, "fold-bn,dce", [Log()])
    assert events == ["enter", "before fold-bn", "after fold-bn", "before dce", "after dce", "exit"]
