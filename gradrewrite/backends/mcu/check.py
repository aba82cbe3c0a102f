"""``gradrewrite check``: every op the mcu backend cannot generate, all at once, and in
an int8 graph every op that stays fp32 between the int8 layers, with the reason.

Runs the lowering in collect mode (nothing is written or built): an unsupported node
is recorded with its module path and reason, given a stand-in buffer of its shape,
and the walk goes on, so one run lists every problem.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...rewrite.graph import Graph, module_path, op_name
from .inference.lowering import unsupported_ops
from .inference.lowering.int8_elementwise import PAD, QDQ, VIEWS
from .inference.lowering.lowerer import Lowerer
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


def check_train_step(graph: Graph, target: str = "host") -> list[UnsupportedOp]:
    """Every op of a training-step graph the mcu backend cannot lower (an int8 step: also
    every op without a bit-exact integer reference), in graph order; empty: it generates."""
    from .training.lowering import unsupported_train_ops

    get_target(target)
    return [UnsupportedOp(op, path, reason) for op, path, reason in unsupported_train_ops(graph)]


def fp32_ops(graph: Graph) -> list[UnsupportedOp]:
    """The ops of an int8 graph that run as fp32 kernels (with quantize/dequantize glue
    around them), each with the reason it is not int8; empty for a float graph. Views
    and the int8 patterns' own float nodes (their kernels replace them) are left out."""
    lw = Lowerer(graph, collect=True, sparse=False)
    if not lw.qlayers:
        return []
    plan = lw.qelems
    out = []
    for n in graph.gm.graph.nodes:
        if n.op != "call_function" or n in lw.skip or n in lw.qlayers or n in plan.elems or n in plan.aliases \
                or n.target in QDQ or n.target in VIEWS or lw.is_const(n):
            continue
        x = n.args[0] if n.args else None
        if n.target in PAD and getattr(x, "op", None) == "placeholder" and Lowerer._input_quantize(x, True):
            continue   # pads the caller's int8 input
        out.append(UnsupportedOp(op_name(n), module_path(n) or "<root>",
                                 plan.fp32.get(n, "no int8 kernel for this op")))
    return out


def patch_plan(graph: Graph, max_overhead: float | None = None) -> str | None:
    """What patch-based execution (``inference/patches.py``) would do at the default
    options: the split, the grid, the recompute and the arena before and after; None when
    the graph does not lower (the unsupported ops say why)."""
    from .inference.lowering import Unsupported, lower
    from .inference.patches import DEFAULT_MAX_OVERHEAD, apply

    try:
        prog = lower(graph)
    except Unsupported:
        return None
    _, r = apply(prog, "auto", DEFAULT_MAX_OVERHEAD if max_overhead is None else max_overhead)
    if "split_step" not in r:
        return f"patches: off ({r.get('reason', 'no candidate')})"
    plan = (f"split after {r['split_path'] or r['split_op']} ({'x'.join(map(str, r['split_shape']))}), "
            f"{'x'.join(map(str, r['grid']))} patches, {100 * r['macs_overhead']:.1f}% more MACs "
            f"(limit {100 * r['max_overhead']:.0f}%), arena {r['arena_unpatched_bytes'] / 1024:.1f} -> "
            f"{r['arena_bytes'] / 1024:.1f} KB (the input read window by window, not in the arena)")
    return f"patches: on, {plan}" if r["applied"] else f"patches: off by default ({r['reason']}); best: {plan}"
