"""Backward pruning: freeze parameters, partial-channel weight gradients, dead code.

Freezing a parameter drops its update from the outputs; ``dead_code`` then removes the
gradient computation nobody reads, and shrinks each ``convolution_backward``'s output
mask, so below the earliest layer that needs a gradient no input gradient is computed.
A partial-channel layer gets a new weight-gradient op on the first ``rows`` output
channels of its output gradient (and, for depthwise convs, of its input).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ...errors import PassError
from ...rewrite.graph import Graph, copy_meta, module_path
from ...rewrite.train_step import dead_code, emit_update, rebuild_outputs, role
from .config import Layer

aten = torch.ops.aten
_STRIP = (aten.t.default, aten.permute.default, aten.view.default, aten._unsafe_view.default)


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _call(graph: Graph, target, args, val, like: fx.Node) -> fx.Node:
    node = graph.graph.call_function(target, args)
    copy_meta(like, node)
    node.meta["custom"] = {"train_role": "backward"}
    node.meta["val"] = val
    return node


def _conv_partial(graph: Graph, layer: Layer, grad: fx.Node, rows: int) -> fx.Node:
    cb = grad.args[0]
    if not (grad.target is operator.getitem and cb.target == aten.convolution_backward.default):
        raise PassError(f"cannot find the weight-gradient convolution of layer {layer.path!r}",
                        "use ratio 1 for this layer")
    go, x, w = cb.args[0], cb.args[1], cb.args[2]
    stride, pad, dil, transposed, out_pad, groups = cb.args[4:10]
    wval = w.meta["val"]
    depthwise = groups > 1
    with graph.graph.inserting_after(grad):
        go_s = _call(graph, aten.slice.Tensor, (go, 1, 0, rows),
                     _meta((go.meta["val"].shape[0], rows, *go.meta["val"].shape[2:]), wval.dtype), grad)
    with graph.graph.inserting_after(go_s):
        w_s = _call(graph, aten.slice.Tensor, (w, 0, 0, rows), _meta((rows, *wval.shape[1:]), wval.dtype), grad)
    last = w_s
    if depthwise:  # each output channel reads only its own input channel
        with graph.graph.inserting_after(last):
            x = _call(graph, aten.slice.Tensor, (x, 1, 0, rows),
                      _meta((x.meta["val"].shape[0], rows, *x.meta["val"].shape[2:]), wval.dtype), grad)
        last = x
    with graph.graph.inserting_after(last):
        new_cb = _call(graph, aten.convolution_backward.default,
                       (go_s, x, w_s, None, stride, pad, dil, transposed, out_pad,
                        rows if depthwise else groups, [False, True, False]),
                       (None, _meta((rows, *wval.shape[1:]), wval.dtype), None), grad)
    with graph.graph.inserting_after(new_cb):
        gw = _call(graph, operator.getitem, (new_cb, 1), new_cb.meta["val"][1], grad)
    return gw


def _linear_partial(graph: Graph, layer: Layer, grad: fx.Node, rows: int) -> fx.Node:
    node = grad
    while node.op == "call_function" and node.target in _STRIP:
        node = node.args[0]
    fwd = next(n for n in graph.graph.nodes if n.name == layer.node)
    x = fwd.args[1] if fwd.target == aten.addmm.default else fwd.args[0]
    if node.target != aten.mm.default:
        raise PassError(f"cannot find the weight-gradient matmul of layer {layer.path!r}",
                        "use ratio 1 for this layer")
    batch, out = x.meta["val"].shape[0], layer.out_channels
    go = None
    for arg in node.args:
        base = arg
        while base.op == "call_function" and base.target in _STRIP:
            base = base.args[0]
        if base is not x and tuple(base.meta["val"].shape) == (batch, out):
            go = base
    if go is None:
        raise PassError(f"cannot find the output gradient of layer {layer.path!r}",
                        "use ratio 1 for this layer")
    dtype = go.meta["val"].dtype
    inp = x.meta["val"].shape[1]
    with graph.graph.inserting_after(grad):
        go_s = _call(graph, aten.slice.Tensor, (go, 1, 0, rows), _meta((batch, rows), dtype), grad)
    with graph.graph.inserting_after(go_s):
        go_t = _call(graph, aten.t.default, (go_s,), _meta((rows, batch), dtype), grad)
    with graph.graph.inserting_after(go_t):
        gw = _call(graph, aten.mm.default, (go_t, x), _meta((rows, inp), dtype), grad)
    return gw


def _partial(graph: Graph, layer: Layer, grad: fx.Node, rows: int) -> fx.Node:
    """The partial-channel weight gradient; through ``mul(g, s)`` when the parameter is an
    int8-stored weight (``w = w_q * s``: its gradient is the float one times s)."""
    if grad.target == aten.mul.Tensor and isinstance(grad.args[1], fx.Node) and grad.args[1].op == "get_attr":
        inner = _partial(graph, layer, grad.args[0], rows)
        scale = graph.attr(grad.args[1])
        if scale.dim() == 0 or scale.shape[0] == 1:
            s_node = grad.args[1]
        else:
            s_node = graph.add_attr(f"{grad.args[1].target}_rows{rows}", scale[:rows].clone(), before=inner.next,
                                    parameter=False)
        with graph.graph.inserting_after(s_node if s_node.op == "get_attr" and s_node is not grad.args[1]
                                         else inner):
            out = _call(graph, aten.mul.Tensor, (inner, s_node), _meta(tuple(inner.meta["val"].shape),
                                                                        inner.meta["val"].dtype), grad)
        return out
    return (_conv_partial if layer.kind == "conv" else _linear_partial)(graph, layer, grad, rows)


def apply_scheme(graph: Graph, chosen: dict[str, int | None], layers: list[Layer]) -> dict:
    """Keep only ``chosen`` parameters trained (rows: partial channels); prune the rest."""
    ts = graph.meta["train_step"]
    params = ts["params"]
    missing = [p for p in chosen if not params.get(p, {}).get("trained")]
    if missing:
        raise PassError(f"parameters {', '.join(missing)} have no gradient in this training step",
                        "run sparse-update on a full training step (compile --train) first")
    nodes = {n.name: n for n in graph.graph.nodes}
    by_weight = {l.weight: l for l in layers}
    before = graph.node_count()
    frozen = []
    for path, info in params.items():
        if not info["trained"]:
            continue
        if path not in chosen:
            info.update(trained=False, grad=None, update=None, momentum=None, rows=None)
            frozen.append(path)
            continue
        rows = chosen[path]
        if rows is None or rows == info["shape"][0]:
            continue
        layer = by_weight[path]
        grad = nodes[info["grad"]]
        new_grad = _partial(graph, layer, grad, rows)
        new_grad._rename(f"{path.replace('.', '_')}_grad_rows{rows}")
        new_grad.meta["param"] = path
        emit_update(graph, path, new_grad, rows=rows)
    rebuild_outputs(graph)
    removed = dead_code(graph)
    graph.commit()
    return {"frozen_params": len(frozen), "trained_params": len(chosen),
            "nodes_removed": removed, "nodes": {"before": before, "after": graph.node_count()}}


def backward_stop(graph: Graph, layers: list[Layer]) -> str | None:
    """The earliest layer whose backward still runs (None if no backward)."""
    seen = {module_path(n) for n in graph.call_nodes() if role(n) == "backward"}
    for layer in layers:
        if layer.path in seen:
            return layer.path
    return None
