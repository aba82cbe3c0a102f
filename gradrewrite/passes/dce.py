"""dce: remove computations whose results nobody uses, and weights only they used."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..rewrite.graph import Graph, op_name
from ..rewrite.registry import PassContext, PassResult, register_pass


@register_pass("dce", ensures=("no-dead-code",))
@dataclass(frozen=True)
class DeadCodeElimination:
    """Erase pure nodes with no users (repeatedly), then unused weights."""

    exact = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed: Counter = Counter()
        params_before = graph.parameter_count()
        changed = True
        while changed:
            changed = False
            for node in reversed(list(graph.graph.nodes)):
                if node.op == "call_function" and not node.users and not node.is_impure():
                    removed[op_name(node)] += 1
                    graph.graph.erase_node(node)
                    changed = True
        graph.commit()
        return PassResult(bool(removed), {
            "removed_nodes": sum(removed.values()),
            "removed_by_op": dict(removed),
            "removed_parameters": params_before - graph.parameter_count(),
        })
