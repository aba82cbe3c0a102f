"""Where GPTQ's layer inputs come from: the whole graph run up to each layer, or a stack of
repeated layers run one layer at a time (``quantize(method=gptq,layerwise=…)``).

GPTQ quantizes the linears in graph order, each one's Hessian from calibration inputs that
already passed through the quantized earlier layers. ``WholeGraphCalibration`` runs the
graph from its inputs up to the layer's input for every Hessian, keeping every quantized
layer's dequantized weight (the model again, in fp32) and costing O(layers²) node runs.

``LayerwiseCalibration`` cuts the graph at the boundaries of its decoder layers
(``layer_stack.py``) and keeps one buffer per calibration sample of the values that cross
the current cut (the hidden state, the rotary tables, the attention mask…). A Hessian is
taken by running only the layer's own span on that buffer, up to the linear's input; once
GPTQ moves to the next layer, the calibration activations are pushed through the quantized
layer, the buffer is replaced by what crosses the next cut, and the layer's dequantized
weights are dropped. The same nodes run on the same values, so the Hessians, and the
stored weights, are bit-identical to the whole-graph path.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from ...errors import ConfigError
from ...rewrite.calibration import progress as iterate
from ...rewrite.graph import Graph
from .gptq import HessianSums, QuantizedRunner, layer_hessian
from .layer_stack import LayerStack, find_layer_stack

LAYERWISE = ("auto", "on", "off")


class WholeGraphCalibration:
    """Each Hessian from the graph run from its inputs up to the layer's input."""

    def __init__(self, graph: Graph, samples: Sequence[tuple], padding, progress):
        self.graph, self.samples, self.padding, self.progress = graph, samples, padding, progress
        self.weights: dict = {}   # every quantized layer's dequantized weight, kept to the end

    def hessian(self, x: fx.Node, description: str):
        return layer_hessian(self.graph, x, self.samples, self.progress, description,
                             weights=self.weights, padding=self.padding)


class LayerwiseCalibration:
    """Each Hessian from one span of ``stack`` run on the buffered values that enter it."""

    def __init__(self, graph: Graph, stack: LayerStack, samples: Sequence[tuple], padding, progress):
        self.graph, self.stack, self.samples, self.padding, self.progress = \
            graph, stack, samples, padding, progress
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        self.buffer: list[dict[fx.Node, Any]] = [dict(zip(inputs, s)) for s in samples]
        self.entered = 0          # the span whose inputs the buffer holds
        self.weights: dict = {}   # dequantized weights of the entered span's quantized layers

    def hessian(self, x: fx.Node, description: str):
        spans = self.stack.spans(self.graph)
        target = next((i for i, span in enumerate(spans) if x in set(span)), 0)
        while self.entered < target:
            self._push(spans, self.entered)
        sums = HessianSums(self.padding)
        # x is computed in the entered span, or it entered it (a value of an earlier span)
        self._run([] if x in self.buffer[0] else spans[self.entered], description, stop=x, keep=set(),
                  each=lambda i, env: x in env and sums.add(i, env[x]))
        return sums.result(x)

    def _push(self, spans: list[list[fx.Node]], index: int) -> None:
        """The calibration activations through span ``index`` (its linears quantized): the
        buffer becomes the values that enter span ``index + 1``; the span's weights go."""
        later = {n for span in spans[index + 1:] for n in span}
        crossing = {n for n in list(self.buffer[0]) + spans[index] if any(u in later for u in n.users)}
        new: list[dict] = []

        def keep(i, env):
            new.append({n: env[n] for n in crossing})
            self.buffer[i] = {}   # what entered this span is no longer needed

        self._run(spans[index], f"gptq {self.stack.label(index)}: through the quantized layer",
                  stop=None, keep=crossing, each=keep)
        self.buffer = new
        self.weights.clear()
        self.entered = index + 1

    def _run(self, nodes: list[fx.Node], description: str, *, stop: fx.Node | None, keep: set, each) -> None:
        """Run ``nodes`` on every sample's buffer (up to ``stop``), calling ``each(i, env)``;
        values are dropped after their last reader in ``nodes`` unless in ``keep``."""
        position = {n: i for i, n in enumerate(nodes)}
        last_read: dict[fx.Node, int] = {}
        for n in nodes:
            for a in n.all_input_nodes:
                last_read[a] = position[n]
        runner = QuantizedRunner(self.graph.gm, self.weights)
        tracked = self.padding.track(self.samples) if self.padding else self.samples
        with torch.no_grad():
            for i, _ in enumerate(iterate(self.progress, description, tracked)):
                env = dict(self.buffer[i])
                runner.env = env
                for j, n in enumerate(nodes):
                    for a in n.all_input_nodes:
                        if a.op == "get_attr" and a not in env:
                            env[a] = runner.fetch_attr(a.target)
                    env[n] = runner.run_node(n)
                    if n is stop:
                        break
                    for a in (*n.all_input_nodes, n):
                        if last_read.get(a, -1) <= j and a not in keep:
                            env.pop(a, None)
                each(i, env)
                runner.env = {}


def gptq_calibration(graph: Graph, linears: Sequence[fx.Node], samples: Sequence[tuple], padding,
                     progress, layerwise: str) -> tuple[WholeGraphCalibration | LayerwiseCalibration,
                                                        dict[str, Any]]:
    """The calibration GPTQ runs on (``layerwise``: auto | on | off) and its report entry."""
    if layerwise == "off":
        return (WholeGraphCalibration(graph, samples, padding, progress),
                {"path": "whole-graph", "reason": "layerwise=off"})
    stack, reason = find_layer_stack(graph, linears)
    if stack is None:
        if layerwise == "on":
            raise ConfigError(f"layerwise=on: {reason}", "use layerwise=auto or layerwise=off")
        return WholeGraphCalibration(graph, samples, padding, progress), {"path": "whole-graph", "reason": reason}
    return (LayerwiseCalibration(graph, stack, samples, padding, progress),
            {"path": "layer-wise", "stack": stack.prefix, "layers": stack.count, "reason": reason})


__all__ = ["LAYERWISE", "WholeGraphCalibration", "LayerwiseCalibration", "gptq_calibration"]
