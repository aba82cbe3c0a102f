"""Patterns of a training-step graph that the lowering and the integer reference both
read: the SGD update chain of a parameter (with its QAS factors), the momentum update,
the readers of a parameter through views."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from .....rewrite.graph import Graph

aten = torch.ops.aten


def readers(node: fx.Node) -> list[fx.Node]:
    """Nodes reading ``node``'s storage, through views."""
    views = {aten.slice.Tensor, aten.permute.default, aten.t.default, aten.view.default,
             aten.expand.default, aten.transpose.int}
    out, stack = [], list(node.users)
    while stack:
        u = stack.pop()
        if u.target in views:
            stack.extend(u.users)
        else:
            out.append(u)
    return out


def update_chain(node: fx.Node) -> tuple | None:
    """``sub(w, mul(mul(...mul(g, c1)..., ck), lr))`` that writes a parameter ->
    (w, g, [c1..ck constant factor nodes], [the muls], lr); plain SGD has no factors,
    QAS on an int8 weight has two (the chain rule's s and QAS's s^-2)."""
    if node.op != "call_function" or node.target != aten.sub.Tensor:
        return None
    if not node.meta.get("custom", {}).get("writes"):
        return None
    w, scaled = node.args[:2]
    if not (isinstance(scaled, fx.Node) and scaled.target == aten.mul.Tensor and len(scaled.users) == 1
            and isinstance(scaled.args[0], fx.Node) and not isinstance(scaled.args[1], fx.Node)):
        return None
    muls, factors, g = [scaled], [], scaled.args[0]
    while g.target == aten.mul.Tensor and len(g.users) == 1 and isinstance(g.args[1], fx.Node) \
            and g.args[1].op == "get_attr" and isinstance(g.args[0], fx.Node):
        factors.append(g.args[1])
        muls.append(g)
        g = g.args[0]
    return w, g, factors, muls, float(scaled.args[1])


def momentum_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """``add(mul(v, momentum), g)`` that writes a momentum buffer -> (v, g, momentum)."""
    if node.op != "call_function" or node.target != aten.add.Tensor:
        return None
    if not str(node.meta.get("custom", {}).get("writes", "")).endswith("_momentum"):
        return None
    scaled, g = node.args[:2]
    if not (isinstance(scaled, fx.Node) and scaled.target == aten.mul.Tensor and len(scaled.users) == 1
            and not isinstance(scaled.args[1], fx.Node)):
        return None
    return scaled.args[0], g, float(scaled.args[1])


def update_factor(graph: Graph, factors: list[fx.Node], storage: np.ndarray, rows: int) -> np.ndarray:
    """The per-row float32 factor f of an integer update (delta = lr * (g * f[row])): the
    chain's constant factors times the storage's, multiplied in float64."""
    f = np.asarray(storage, np.float64).reshape(-1)[:rows].copy()
    for node in factors:
        t = graph.attr(node).detach().double().reshape(-1).numpy()
        f *= t[0] if t.size == 1 else t[:rows]
    return f.astype(np.float32)


def param_attr(node: Any) -> str | None:
    while isinstance(node, fx.Node) and node.target == aten.slice.Tensor:
        node = node.args[0]
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None
