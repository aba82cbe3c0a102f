"""Operator reordering: apply each update right after its gradient is produced.

Autodiff emits every update after the whole backward, so all gradients stay alive to
the end. Moving each update's ops to just after its last input lets the gradient
buffer die at once (the update writes the parameter in place).
"""
from __future__ import annotations

from ...rewrite.graph import Graph
from ...rewrite.train_step import role


def reorder_updates(graph: Graph) -> int:
    """Move update ops right after their inputs; returns how many ops moved."""
    order = {n: i for i, n in enumerate(graph.graph.nodes)}
    moved = 0
    for node in [n for n in graph.graph.nodes if role(n) == "update"]:
        deps = list(node.all_input_nodes)
        writes = (node.meta.get("custom") or {}).get("writes")
        if writes:  # an in-place write waits for every other reader of the old value
            deps += [u for a in graph.graph.nodes if a.op == "get_attr" and a.target == writes
                     for u in _readers(a) if role(u) != "update"]
        anchor = max(deps, key=lambda a: order[a])
        if anchor.next is not node:
            anchor.append(node)
            moved += 1
        order = {n: i for i, n in enumerate(graph.graph.nodes)}
    graph.graph.lint()
    graph.gm.recompile()
    return moved


def _readers(node):
    """Users of a weight, looking through views (which read it later)."""
    from ...rewrite.memory_plan import _is_view

    out, stack = [], list(node.users)
    while stack:
        u = stack.pop()
        out.append(u)
        if _is_view(u):
            stack.extend(u.users)
    return out
