"""Lowering a training-step graph (``rewrite/train_step.py``) to kernel calls.

The forward reuses the inference lowering; this package adds the loss, the backward
ops autograd emits for the layers the forward kernels cover, and the SGD update
(``lowerer.py`` has the walk, the handler modules below register their ops). The
learning rate is a run-time argument of ``model_train_step``: the update
``sub(w, mul(g, lr))`` is matched and emitted as ``gr_sgd_f32(w, g, lr, n)``.
"""
from __future__ import annotations

import torch.fx as fx

from .....rewrite.graph import Graph
from ...inference.lowering.base import Unsupported
from . import backward, float_head, forward, int8, loss, update  # noqa: F401  (register handlers)
from .buffers import TrainProgram
from .lowerer import TrainLowerer


def lower_train(graph: Graph) -> TrainProgram:
    """The training step as kernel calls; raises ``Unsupported`` at the first op it cannot generate."""
    lw = TrainLowerer(graph)
    prog = lw.run()
    loss_name = lw.ts["loss"]
    out_node = next(n for n in lw.graph.gm.graph.nodes if n.op == "output")
    loss_node = next(n for n in out_node.args[0] if isinstance(n, fx.Node) and n.name == loss_name)
    if lw.forward_steps is None or lw.logits_node is None:
        raise Unsupported("the training step has no log-softmax cross-entropy loss (use --loss cross_entropy)")
    logits = lw.logits_val if lw.logits_val is not None else lw.vals[lw.logits_node.args[0]]
    prog.outputs = [lw.vals[loss_node]]
    frozen = [p for p, info in lw.ts["params"].items() if not info.get("trained")]
    return TrainProgram(prog, lw.forward_steps, logits, list(lw.trained.values()), frozen,
                        float(lw.ts["optimizer"]["lr"]), lw.int8, lw.rounding, lw.seed, lw.graph)


def unsupported_train_ops(graph: Graph) -> list[tuple[str, str, str]]:
    """(op, module path, reason) for every op of a training step the mcu backend cannot
    generate (an int8 step: also every op without a bit-exact integer reference), all at once."""
    try:
        lw = TrainLowerer(graph, collect=True)
    except Unsupported as exc:   # the step as a whole (momentum with int8, a non-int8 quantizer ...)
        return [("training step", "<root>", str(exc))]
    try:
        lw.run()
    except Unsupported as exc:  # an output of an unsupported op
        lw.unsupported.append(("output", "<root>", str(exc)))
    seen, out = set(), []
    for row in lw.inexact + lw.unsupported:
        if row[:2] not in seen:
            seen.add(row[:2])
            out.append(row)
    return out
