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
from . import backward, forward, int8, loss, update  # noqa: F401  (register handlers)
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
