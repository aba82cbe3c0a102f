"""GWQ's gradient criterion one decoder layer at a time: a streamed backward
(``quantize(criterion=gradient, layerwise=auto|on)``).

``outliers.gradient_scores`` differentiates the whole model per calibration sample: a copy
of the graph with every quantized weight as a parameter, and every layer's activations
held for the backward. Here the graph is cut at the boundaries of its repeated layers
(``layer_stack.py``) and the gradient is the same one, computed by checkpointing at the
cuts:

1. forward: each span (before the stack, every layer, after it) runs on all samples and
   only the values that cross into the next span are kept (the hidden state, rotary
   tables, the mask…); a layer's own activations are dropped as soon as it has run;
2. at the head the loss of each sample is differentiated w.r.t. the last span's weights
   and the values that entered it;
3. the layers are walked backwards: each one's forward is run again from its saved
   inputs, with autograd on, and its output gradient (what the span above sent down) is
   propagated to its weights and to its inputs, which the span below receives. Values
   that pass a layer untouched (rotary tables, the mask) keep their gradient and collect
   every layer's contribution to it.

So only one layer's weights, activations and graph for autograd are alive at a time,
plus the cut values of every sample (tokens x hidden per layer). The gradient is exact:
the same per-sample gradients as autograd through the whole graph, up to the order of
floating-point sums, so the aggregated scores (``sum |g|`` / ``sum g^2``) agree to
rounding. Each weight is read by one span only (``find_layers`` leaves out weights shared
between layers), so a layer's score is final once its span is done, and is reduced to
the layer's outlier mask at once (``reduce``), not held as a float tensor.

Cost against the whole-graph gradient: one extra forward of every layer but the last
span (the recomputation), i.e. about 4/3 of the compute of forward + backward.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ...rewrite.calibration import progress as iterate
from ...rewrite.graph import Graph
from ...rewrite.mapped_safetensors import release_pages
from .layer_stack import LayerStack, find_layer_stack
from .layers import QLayer
from .outliers import accumulate, lm_input, sample_loss


def gradient_stack(graph: Graph, layers: Sequence[QLayer], layerwise: str) -> tuple[LayerStack | None, str]:
    """The stack the gradients can be streamed over (None: the whole-graph gradient), and why."""
    if layerwise == "off":
        return None, "layerwise=off"
    stack, reason = find_layer_stack(graph, [l.node for l in layers])
    if stack is None:
        return None, reason
    spans = stack.spans(graph)
    where = {n: i for i, span in enumerate(spans) for n in span}
    for l in layers:
        readers = {where.get(u) for u in l.weight_node.users}
        if len(readers) != 1:
            return None, f"{l.param} is read in more than one span of {stack.prefix}"
    return stack, reason


class _Spans:
    """The spans and, for each, the values entering it (computed before it, read in it or later)."""

    def __init__(self, graph: Graph, stack: LayerStack):
        self.spans = stack.spans(graph)
        last = len(self.spans) - 1
        self.output = next(n for n in graph.nodes if n.op == "output")
        defined = {n: -1 for n in graph.nodes if n.op == "placeholder"}
        defined.update({n: i for i, span in enumerate(self.spans) for n in span})
        read_until: dict[fx.Node, int] = {}
        for i, span in enumerate(self.spans):
            for n in span:
                for a in n.all_input_nodes:
                    read_until[a] = max(read_until.get(a, -1), i)
        for a in self.output.all_input_nodes:
            read_until[a] = last
        self.entering = [[n for n, d in defined.items() if d < i <= read_until.get(n, -1)]
                         for i in range(len(self.spans))]
        self.defined = defined


def layerwise_gradient_scores(graph: Graph, stack: LayerStack, layers: Sequence[QLayer],
                              samples: Sequence[tuple], *, loss: str | Callable, aggregation: str,
                              rtn: Callable[[torch.Tensor], torch.Tensor], progress=None,
                              reduce: Callable[[torch.Tensor], Any] | None = None) -> dict[str, Any]:
    """``outliers.gradient_scores``'s scores (``reduce``d per layer as soon as final) by a
    streamed backward over ``stack``'s layers."""
    cut = _Spans(graph, stack)
    spans, entering = cut.spans, cut.entering
    by_node = {l.weight_node: l for l in layers}
    span_layers = [list({a: by_node[a] for n in span for a in n.all_input_nodes if a in by_node}.values())
                   for span in spans]
    first_weighted = min(i for i, ls in enumerate(span_layers) if ls)
    runner = fx.Interpreter(graph.gm)
    ids_index = lm_input(graph) if loss == "causal-lm" else None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    name = loss if isinstance(loss, str) else "user loss"

    def weights(i: int) -> dict[fx.Node, torch.Tensor]:
        """Span ``i``'s weights to differentiate, as leaves (round-to-nearest for mse)."""
        out = {}
        for l in span_layers[i]:
            w = graph.attr(l.weight_node).detach().float()
            out[l.weight_node] = (rtn(w) if loss == "mse" else w).detach().requires_grad_(True)
        return out

    def run(i: int, env: dict) -> dict:
        for n in spans[i]:
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in env:
                    env[a] = runner.fetch_attr(a.target)
            runner.env = env
            env[n] = runner.run_node(n)
        runner.env = {}
        return env

    # 1. forward, keeping what enters each span (the fp32 graph alongside, for mse's reference)
    saved: list[list[dict]] = [[dict(zip(placeholders, s)) for s in samples]]
    ref_in = [dict(zip(placeholders, s)) for s in samples] if loss == "mse" else None
    refs: list = [None] * len(samples)
    with torch.no_grad():
        for i in range(len(spans) - 1):
            nxt = []
            w = weights(i) if loss == "mse" else {}   # else the graph's own weights
            for s in iterate(progress, f"gradients ({name}): forward {stack.label(i)}", range(len(samples))):
                env = run(i, {**saved[i][s], **w})
                nxt.append({n: env[n] for n in entering[i + 1]})
                if ref_in is not None:
                    env = run(i, ref_in[s])
                    ref_in[s] = {n: env[n] for n in entering[i + 1]}
            saved.append(nxt)
            release_pages(graph)
        if ref_in is not None:
            for s in range(len(samples)):
                env = run(len(spans) - 1, ref_in[s])
                refs[s] = [t for t in pytree.tree_leaves(pytree.tree_map(
                    lambda a: env.get(a, a) if isinstance(a, fx.Node) else a, cut.output.args[0]))
                    if isinstance(t, torch.Tensor)]
            ref_in = None

    # 2-3. backward from the head, one span at a time
    grads: list[dict[fx.Node, torch.Tensor]] = [{} for _ in samples]
    scores: dict[str, Any] = {}
    for i in range(len(spans) - 1, first_weighted - 1, -1):
        head = i == len(spans) - 1
        span_set = set(spans[i])
        acc = {l.param: None for l in span_layers[i]}
        need_inputs = i > first_weighted
        w = weights(i)
        for s in iterate(progress, f"gradients ({name}): backward {stack.label(i)}", range(len(samples))):
            sent = grads[s]
            outs = [n for n in sent if n in span_set]
            if not head and not outs:
                continue
            leaves = {}
            with torch.enable_grad():
                env = dict(saved[i][s])
                if need_inputs:
                    for n in entering[i]:
                        v = env[n]
                        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
                            env[n] = leaves[n] = v.detach().requires_grad_(True)
                env.update(w)
                run(i, env)
                if head:
                    out = [t for t in pytree.tree_leaves(pytree.tree_map(
                        lambda a: env.get(a, a) if isinstance(a, fx.Node) else a, cut.output.args[0]))
                        if isinstance(t, torch.Tensor)]
                    targets, given = [sample_loss(loss, out, samples[s], ids_index, refs[s])], None
                else:
                    targets, given = [env[n] for n in outs], [sent.pop(n) for n in outs]
                wrt = list(w.values()) + list(leaves.values())
                if not wrt or not any(t.requires_grad for t in targets):
                    continue
                got = torch.autograd.grad(targets, wrt, grad_outputs=given, allow_unused=True)
            for l, g in zip(span_layers[i], got[:len(w)]):
                if acc[l.param] is None:
                    acc[l.param] = torch.zeros(g.shape if g is not None else w[l.weight_node].shape)
                accumulate(acc, l.param, g, aggregation)
            for n, g in zip(leaves, got[len(w):]):
                if g is not None:
                    sent[n] = sent[n] + g if n in sent else g
            del env, leaves, got
        for l in span_layers[i]:
            score = acc.pop(l.param)
            if score is None:
                score = torch.zeros(graph.attr(l.weight_node).shape)
            scores[l.param] = reduce(score) if reduce else score
        saved[i] = []
        del w
        release_pages(graph)
    return scores


__all__ = ["gradient_stack", "layerwise_gradient_scores"]
