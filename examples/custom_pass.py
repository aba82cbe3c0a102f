"""Write your own pass: a rule (pattern / check / rewrite) registered by name.

The pass collapses relu(relu(x)) and hardtanh-style clamps that follow a relu6; it is
then usable from pipelines like any built-in pass.

    python examples/custom_pass.py
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradrewrite as gr  # noqa: E402
from gradrewrite.rewrite.rules import Op, Rule, Var, apply_rules  # noqa: E402

aten = torch.ops.aten

RELU_RELU = Rule(
    "relu-relu",
    Op(aten.relu.default, Op(aten.relu.default, Var("x"), name="inner", single_use=True)),
    rewrite=lambda graph, m: m["inner"],          # the inner relu replaces the outer one
    doc="relu is idempotent")


def _clamp_check(graph, m):
    lo, hi = m["lo"], m["hi"]
    if not all(isinstance(v, (int, float)) for v in (lo, hi)):
        return "clamp bounds are not constants"
    inner = m["inner"]
    if inner.target == aten.relu6.default:
        a, b = 0.0, 6.0
    else:  # hardtanh(x, min_val=-1, max_val=1)
        a = inner.args[1] if len(inner.args) > 1 else -1.0
        b = inner.args[2] if len(inner.args) > 2 else 1.0
    return None if lo <= a and hi >= b else "clamp is tighter than the activation's range"


RELU6_CLAMP = Rule(
    "clamp-after-bounded-activation",
    Op(aten.clamp.default,
       Op((aten.relu6.default, aten.hardtanh.default), Var("x"), name="inner", single_use=True),
       Var("lo"), Var("hi")),
    rewrite=lambda graph, m: m["inner"],
    check=_clamp_check,
    doc="clamp(relu6(x), lo<=0, hi>=6) is relu6(x)")


@gr.register_pass("simplify-activations")
@dataclass(frozen=True)
class SimplifyActivations:
    """Collapse redundant activation chains."""

    exact = True

    def run(self, graph, ctx):
        stats = apply_rules(graph, [RELU_RELU, RELU6_CLAMP])
        return gr.PassResult(stats.total() > 0, stats.as_report())


class Net(torch.nn.Module):
    def forward(self, x):
        a = torch.relu(torch.relu(x))
        b = torch.clamp(torch.nn.functional.relu6(x), -1, 10)
        c = torch.clamp(torch.nn.functional.relu6(x), 0, 3)    # not redundant: kept
        return a + b + c


if __name__ == "__main__":
    graph = gr.capture(Net(), (torch.randn(4, 8),))
    result = gr.run_pipeline(graph, "simplify-activations")
    print(result.records[0].report)
    print(graph.text())
