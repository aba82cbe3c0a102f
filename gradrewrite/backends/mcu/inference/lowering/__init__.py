"""Lowering: an ATen graph as a ``Program``, the kernel call sequence the code
generator writes out (``..codegen``).

``lowerer.py`` walks the graph; each op goes to the handler its op-family module
registered in ``base.HANDLERS`` (imported below, so the table is complete whenever
this package is); int8 QDQ layers go to ``int8.py``.
"""
from __future__ import annotations

from .....rewrite.graph import Graph
from ...program import Program
from . import activation, conv_linear, elementwise, pooling, quantize, views  # noqa: F401  (register handlers)
from .base import Unsupported
from .lowerer import Lowerer


def lower(graph: Graph, *, sparse: bool = True, stream: bool = True) -> Program:
    """The graph as a kernel call sequence; raises ``Unsupported`` at the first op it
    cannot generate (``unsupported_ops`` lists them all). ``stream``: int8 depthwise convs
    in place and pointwise expand + depthwise pairs streamed row by row."""
    return Lowerer(graph, sparse=sparse, quantized_inputs=True, stream=stream).run()


def unsupported_ops(graph: Graph) -> list[tuple[str, str, str]]:
    """(op, module path, reason) for every node the backend cannot generate."""
    lw = Lowerer(graph, collect=True, sparse=False)
    try:
        lw.run()
    except Unsupported as exc:  # an output of an unsupported op
        lw.unsupported.append(("output", "<root>", str(exc)))
    return lw.unsupported
