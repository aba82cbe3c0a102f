"""The rule layer: patterns, checks with reasons, fire counts."""
from __future__ import annotations

import torch

from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.rules import Op, Rule, Var, apply_rules

aten = torch.ops.aten


class TwoRelus(torch.nn.Module):
    def forward(self, x):
        a = torch.relu(torch.relu(x))          # relu(relu(x)) -> relu(x)
        b = torch.relu(torch.relu(x * 2))
        c = torch.relu(x - 1)
        return a + b + torch.relu(c) + c        # relu(c) where c has 2 users


def _graph():
    return capture(TwoRelus(), (torch.randn(3, 4),))


def _rule(check=lambda g, m: None):
    return Rule("relu-relu", Op(aten.relu.default, Op(aten.relu.default, Var("x"), name="inner", single_use=True)),
                lambda g, m: m["inner"], check, doc="relu is idempotent")


def test_rule_fires_and_counts():
    g = _graph()
    x = torch.randn(3, 4)
    ref = g(x)[0]
    before = g.op_histogram()["aten.relu"]
    stats = apply_rules(g, [_rule()])
    assert stats.fired["relu-relu"] == 2        # the single-use guard blocks the third
    assert g.op_histogram()["aten.relu"] == before - 2
    torch.testing.assert_close(g(x)[0], ref, rtol=0, atol=0)


def test_check_reason_is_recorded():
    g = _graph()
    stats = apply_rules(g, [_rule(check=lambda g, m: "disabled for test")])
    assert stats.total() == 0
    assert stats.skipped["relu-relu"]["disabled for test"] == 2
    assert g.op_histogram()["aten.relu"] == 6


def test_only_restricts_nodes():
    g = _graph()
    first = next(n for n in g.call_nodes() if n.target == aten.relu.default and n.args[0].target == aten.relu.default)
    stats = apply_rules(g, [_rule()], only=lambda n: n is first)
    assert stats.total() == 1


def test_var_binding_must_agree():
    g = capture(type("Sq", (torch.nn.Module,), {"forward": lambda self, x, y: x * x + x * y})(),
                (torch.randn(2), torch.randn(2)))
    square = Rule("square", Op(aten.mul.Tensor, Var("a"), Var("a")),
                  lambda gr, m: gr.graph.call_function(aten.pow.Tensor_Scalar, (m["a"], 2)))
    stats = apply_rules(g, [square])
    assert stats.total() == 1  # x*y does not match: a cannot bind both x and y
    x, y = torch.randn(2), torch.randn(2)
    torch.testing.assert_close(g(x, y)[0], x * x + x * y)


def test_commit_keeps_state_of_called_submodules():
    g = _graph()
    holder = torch.nn.Module()
    holder.register_buffer("state", torch.ones(3))
    g.gm.add_module("holder", holder)
    x = next(n for n in g.nodes if n.op == "placeholder")
    with g.graph.inserting_after(x):
        g.graph.call_module("holder", ())
    g.commit()
    assert torch.equal(g.gm.holder.state, torch.ones(3))
