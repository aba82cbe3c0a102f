"""Turn a failed ``torch.onnx.export`` into one line naming the op and the layer.

The exporter's own message is many lines of "Next steps" whose first line never names the
op. The node it was working on is still reachable: every exporter stage walks the FX graph
with a local ``node`` (or ``n`` in ``fx.Interpreter.run_node``), and the exception's
traceback keeps those frames. Nodes the exporter creates while decomposing inherit
``nn_module_stack``, so the innermost such node names the layer even when the failing op
(e.g. a ``view`` from a decomposed ``reshape``) is not in the user's graph.
"""
from __future__ import annotations

import re
from typing import Iterator

import torch.fx as fx

from ..errors import BackendError
from ..rewrite.graph import Graph, module_path, op_name

HINT = "rewrite that layer with a pass or use --backend torch (run with --debug for details)"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OVERLOAD = re.compile(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)")


def export_error(exc: BaseException, graph: Graph) -> BackendError:
    chain = list(_chain(exc))
    root = chain[-1]
    node = failing_node(exc)
    missing = _no_lowering(chain)
    if node is not None:
        op, where = op_name(node), module_path(node) or "<root>"
        if missing:
            what = f"no ONNX lowering for {op}"
        else:
            what = f"{op} failed: {type(root).__name__}: {_first_line(root)}"
        return BackendError(f"ONNX export failed at {where} (node {node.name}): {what}", HINT)
    if missing:  # no node in reach: name the op and the layers that use it
        users = [n for n in graph.call_nodes() if op_name(n).startswith(missing.rsplit(".", 1)[0])]
        where = ", ".join(sorted({module_path(n) or "<root>" for n in users})[:5])
        return BackendError(f"ONNX export failed: no ONNX lowering for {missing}"
                            + (f" (used at {where})" if where else ""), HINT)
    return BackendError(f"ONNX export failed: {type(root).__name__}: {_first_line(root)}", HINT)


def failing_node(exc: BaseException) -> fx.Node | None:
    """The innermost graph node in the exception chain's frames (the layer-tagged one if any)."""
    found: list[fx.Node] = []
    for e in _chain(exc):
        tb = e.__traceback__
        while tb is not None:
            local = tb.tb_frame.f_locals
            for name in ("node", "n"):
                value = local.get(name)
                if isinstance(value, fx.Node) and value.op == "call_function":
                    found.append(value)
            tb = tb.tb_next
    tagged = [n for n in found if n.meta.get("nn_module_stack")]
    return (tagged or found or [None])[-1]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _no_lowering(chain: list[BaseException]) -> str | None:
    """The op name when the exporter found no ONNX function for it."""
    for e in chain:
        m = _OVERLOAD.search(str(e))
        if m and type(e).__name__ == "DispatchError":
            return m.group(1) + ("" if m.group(2) == "default" else "." + m.group(2))
    return None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    return lines[0] if lines else ""
