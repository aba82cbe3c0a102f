"""Sparse-update schemes: which biases and weights a training step updates.

Text syntax (pass options)::

    sparse-update(bias_last=6, weights="features.16.conv.2:1/4,classifier.1:1")
    sparse-update(bias_last=6, weights="-1:1,-3:1/2")      # counted from the output
    sparse-update(budget="256KB")                           # search a scheme

A *layer* is a conv or linear op of the forward pass that reads a weight parameter;
``-1`` is the layer nearest the output. A weight entry ``LAYER:RATIO`` updates the
first ``ceil(RATIO * out_channels)`` output channels of that layer's weight.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.fx as fx

from ...errors import ConfigError
from ...rewrite.graph import Graph, module_path, op_kind
from ...rewrite.train_step import role

# weights reach their layer directly, through views, or dequantized (weight * scale)
_VIEWS = (torch.ops.aten.t.default, torch.ops.aten.permute.default, torch.ops.aten.view.default,
          torch.ops.aten.mul.Tensor)


@dataclass(frozen=True)
class Layer:
    path: str            # module path, e.g. features.16.conv.2
    node: str            # forward fx node name
    kind: str            # conv | linear
    weight: str          # parameter path of the weight
    bias: str | None     # parameter path of the bias, if any
    out_channels: int
    groups: int = 1

    def rows(self, ratio: Fraction) -> int:
        return max(1, math.ceil(ratio * self.out_channels))


@dataclass(frozen=True)
class Scheme:
    bias_last: int = 0
    biases: tuple[str, ...] = ()
    weights: tuple[tuple[str, Fraction], ...] = ()   # (layer path, ratio)

    def text(self) -> str:
        parts = [f"bias_last={self.bias_last}"]
        if self.biases:
            parts.append("biases=" + ",".join(self.biases))
        if self.weights:
            parts.append("weights=" + ",".join(f"{p}:{r}" for p, r in self.weights))
        return " ".join(parts)


def _param_of(node: fx.Node, params: dict) -> str | None:
    for _ in range(3):
        if node.op == "get_attr":
            return str(node.target) if str(node.target) in params else None
        if node.op == "call_function" and node.target in _VIEWS:
            node = node.args[0]
        else:
            return None
    return None


def find_layers(graph: Graph) -> list[Layer]:
    """Conv/linear layers of the forward pass, in forward order."""
    params = graph.meta["train_step"]["params"]
    layers = []
    for node in graph.call_nodes():
        if role(node) != "forward" or op_kind(node) not in ("conv", "linear", "matmul"):
            continue
        args = [a for a in node.args if isinstance(a, fx.Node)]
        found = [(a, _param_of(a, params)) for a in args]
        weight = next((p for a, p in found if p and len(params[p]["shape"]) >= 2), None)
        if weight is None:
            continue
        bias = next((p for a, p in found if p and len(params[p]["shape"]) == 1), None)
        out_ch = params[weight]["shape"][0]
        groups = int(node.args[8]) if op_kind(node) == "conv" and len(node.args) > 8 else 1
        layers.append(Layer(module_path(node) or weight.rpartition(".")[0], node.name,
                            "conv" if op_kind(node) == "conv" else "linear", weight, bias,
                            int(out_ch), groups))
    return layers


def parse_ratio(text: str, where: str) -> Fraction:
    try:
        ratio = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"bad channel ratio {text!r} in {where!r}",
                          "write a fraction in (0, 1] such as 1, 1/2, 1/4 or 0.125") from None
    if not 0 < ratio <= 1:
        raise ConfigError(f"channel ratio {text!r} in {where!r} is outside (0, 1]",
                          "write 1, 1/2, 1/4, 1/8 …")
    return ratio


def resolve_layer(ref: str, layers: list[Layer]) -> Layer:
    ref = ref.strip()
    if re.fullmatch(r"-\d+", ref):
        i = int(ref)
        if i == 0 or -i > len(layers):
            raise ConfigError(f"layer {ref} does not exist: the model has {len(layers)} "
                              "trainable conv/linear layers", f"count from -1 to -{len(layers)}")
        return layers[i]
    hits = [l for l in layers if l.path == ref or l.weight == ref or l.weight == f"{ref}.weight"]
    if not hits:
        near = [l.path for l in layers if ref.split(".")[0] in l.path][:6] or [l.path for l in layers[-6:]]
        raise ConfigError(f"no conv/linear layer {ref!r} in the model",
                          f"layers include {', '.join(near)} (or count from the output: -1, -2, …)")
    return hits[0]


def parse_scheme(bias_last: int, weights: str, layers: list[Layer],
                 biases: str = "") -> tuple[Scheme, dict[str, int | None]]:
    """Check a scheme against the model; return it and {param path: rows or None}."""
    if bias_last < 0:
        raise ConfigError(f"bias_last must be >= 0, got {bias_last}", "e.g. bias_last=6")
    with_bias = [l for l in layers if l.bias]
    if bias_last > len(with_bias):
        raise ConfigError(f"bias_last={bias_last} but only {len(with_bias)} layers have a bias",
                          f"use bias_last <= {len(with_bias)}")
    chosen: dict[str, int | None] = {l.bias: None for l in with_bias[len(with_bias) - bias_last:]}
    for ref in [b for b in biases.split(",") if b.strip()]:
        layer = resolve_layer(ref, layers)
        if not layer.bias:
            raise ConfigError(f"layer {layer.path!r} has no bias to update",
                              "drop it from biases, or name a layer with a bias")
        chosen[layer.bias] = None
    entries = []
    for item in [w for w in weights.split(",") if w.strip()]:
        ref, sep, ratio_text = item.rpartition(":")
        if not sep:
            ref, ratio_text = item, "1"
        layer = resolve_layer(ref, layers)
        ratio = parse_ratio(ratio_text, item)
        rows = layer.rows(ratio)
        if rows < layer.out_channels and layer.groups != 1 and layer.groups != layer.out_channels:
            raise ConfigError(f"layer {layer.path!r} is a grouped conv; partial channels work on "
                              "dense and depthwise convs only", f"use {layer.path}:1")
        chosen[layer.weight] = None if rows == layer.out_channels else rows
        entries.append((layer.path, ratio))
    if not chosen:
        raise ConfigError("the sparse-update scheme updates nothing",
                          "give bias_last=K, weights=\"LAYER:RATIO,…\" or budget=\"256KB\"")
    return Scheme(bias_last, tuple(b.strip() for b in biases.split(",") if b.strip()),
                  tuple(entries)), chosen


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?i?b?)\s*", str(text).lower())
    if not m:
        raise ConfigError(f"bad memory budget {text!r}", "write e.g. 256KB, 1.5MB or 300000")
    unit = m[2].rstrip("b").rstrip("i")
    return int(float(m[1]) * {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[unit])
