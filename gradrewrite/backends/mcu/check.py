"""``gradrewrite check``: every op the mcu backend cannot generate, all at once.

Runs the lowering in collect mode (nothing is written or built): an unsupported node
is recorded with its module path and reason, given a stand-in buffer of its shape,
and the walk goes on, so one run lists every problem.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...rewrite.graph import Graph
from .inference.lowering import unsupported_ops
from .targets import get_target


@dataclass(frozen=True)
class UnsupportedOp:
    op: str
    path: str
    reason: str

    def line(self) -> str:
        return f"{self.op} at {self.path}: {self.reason}"


def check_graph(graph: Graph, target: str = "host") -> list[UnsupportedOp]:
    """Unsupported ops of ``graph`` for ``target``, in graph order (empty: all generate).
    The kernels are portable C99, so the list is the same for every target."""
    get_target(target)
    return [UnsupportedOp(op, path, reason) for op, path, reason in unsupported_ops(graph)]
