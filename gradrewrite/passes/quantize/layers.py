"""Which conv/linear layers a quantize pass can take, and what flows into them."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ...errors import ConfigError
from ...rewrite.graph import Graph, module_path, op_name
from ...rewrite.selectors import Selector

aten = torch.ops.aten

CONV_TARGETS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding,
                aten.convolution.default)
LINEAR_TARGETS = (aten.linear.default,)


@dataclass
class QLayer:
    node: fx.Node          # the conv/linear call
    weight_node: fx.Node   # its get_attr weight
    kind: str              # "conv" | "linear"
    path: str              # module path (or the weight's path)
    param: str             # the weight's attribute path

    def args_with(self, x: Any, w: Any, b: Any = "keep") -> tuple:
        """The layer's call arguments with input/weight (and bias) replaced."""
        args = list(self.node.args)
        args[0], args[1] = x, w
        if b != "keep" and len(args) > 2:
            args[2] = b
        return tuple(args)


def find_layers(graph: Graph, select: str, exclude: str, *, kinds: Sequence[str],
                what: str) -> tuple[list[QLayer], list[dict[str, str]]]:
    """Eligible layers among those ``select`` picks, and ``{path, reason}`` for those left
    alone. Raises ConfigError when the selector matches nothing or nothing is eligible."""
    chosen = Selector.parse(select).select(graph, what=what)
    excludes = tuple(g.strip() for g in exclude.split("|") if g.strip())
    layers, skipped, candidates = [], [], 0
    for node in chosen:
        kind = "conv" if node.target in CONV_TARGETS else \
            "linear" if node.target in LINEAR_TARGETS else None
        if kind is None:
            continue
        candidates += 1
        w = node.args[1] if len(node.args) > 1 else None
        path = module_path(node) or (str(w.target) if isinstance(w, fx.Node) else node.name)
        reason = None
        hit = next((g for g in excludes if fnmatch.fnmatchcase(path, g)), None)
        if hit is not None:
            reason = f"excluded by {hit!r}"
        elif kind not in kinds:
            reason = f"{kind} layers are not taken by this mode (it quantizes {', '.join(kinds)})"
        elif not (isinstance(w, fx.Node) and w.op == "get_attr"):
            reason = (f"weight is computed by {op_name(w)}, not a stored weight"
                      if isinstance(w, fx.Node) else "weight is not a tensor")
        elif node.target == aten.convolution.default and node.args[6]:
            reason = "transposed convolution"
        else:
            users = {u for n in graph.nodes if n.op == "get_attr" and n.target == w.target
                     for u in n.users}
            t = graph.attr(w)
            if users != {node}:
                reason = "weight shared with another layer"
            elif not t.dtype.is_floating_point:
                reason = f"weight dtype {str(t.dtype).removeprefix('torch.')} is not floating point"
        if reason:
            skipped.append({"path": path, "reason": reason})
            continue
        layers.append(QLayer(node, w, kind, path, str(w.target)))
    if not layers:
        if not candidates:
            raise ConfigError(f"selector {select!r} for {what} matches no conv or linear layer",
                              "this model has no quantizable layers there; select conv/linear "
                              "layers, e.g. select='op:linear|conv'")
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
        raise ConfigError(f"no layer can be quantized by {what}: {reasons}",
                          "change select/exclude or the mode")
    return layers, skipped


def linear_form(graph: Graph) -> list[str]:
    """``addmm(bias, x, W)`` / ``mm(x, W)`` with a stored ``W [K, N]`` that no other node reads
    (GPT-2's ``Conv1D``, some exported models) -> ``linear(x, W^T, bias)``: the same
    product, in the form the weight-only pass quantizes (its ``[N, K]`` rows are what
    groups, GPTQ and outliers work on). Returns the weights rewritten."""
    done = []
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.addmm.default, aten.mm.default) or node.kwargs:
            continue
        bias, x, w = node.args if node.target == aten.addmm.default else (None, *node.args)
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        t = graph.attr(w)
        readers = {u for n in graph.nodes if n.op == "get_attr" and n.target == w.target for u in n.users}
        if t.dim() != 2 or not t.dtype.is_floating_point or readers != {node}:
            continue
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"
                                     and graph.attr(bias).dim() == 1
                                     and graph.attr(bias).shape[0] == t.shape[1]):
            continue   # a broadcast 2-D "bias" is not a linear layer's
        graph.set_attr(w, t.detach().t().contiguous())
        with graph.graph.inserting_before(node):
            new = graph.graph.call_function(aten.linear.default, (x, w) + ((bias,) if bias is not None else ()))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.graph.erase_node(node)
        done.append(str(w.target))
    if done:
        graph.graph.lint()
        graph.gm.recompile()
    return done


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, Callable[[Any], None]]):
        super().__init__(gm)
        self.watch = watch

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        fn = self.watch.get(n)
        if fn is not None:
            fn(value)
        return value


def observe(graph: Graph, samples: Sequence[tuple[torch.Tensor, ...]],
            watch: dict[fx.Node, Callable[[Any], None]], progress=None, description: str = "") -> None:
    """Run the graph on every sample, calling ``watch[node](value)`` as nodes compute."""
    from ...rewrite.calibration import progress as iterate

    recorder = _Recorder(graph.gm, watch)
    with torch.no_grad():
        for sample in iterate(progress, description, samples):
            recorder.run(*sample)


def layer_input(layer: QLayer) -> fx.Node:
    x = layer.node.args[0]
    if not isinstance(x, fx.Node):
        raise ConfigError(f"layer {layer.path} has a constant input", "exclude it")
    return x


__all__ = ["QLayer", "find_layers", "linear_form", "observe", "layer_input", "CONV_TARGETS", "LINEAR_TARGETS"]
