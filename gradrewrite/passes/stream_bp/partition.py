"""Split a captured forward into segments: prologue, one per layer, epilogue.

Only nodes on the gradient path (those depending on a trained parameter) are assigned:
everything else (position ids, masks, rotary tables) depends on the inputs alone and is
recomputed inside whichever chunk program needs it, as are ops on the weights alone
(``1 + w``). Layers are the children of the
module list with the most numbered children (``model.layers.3``, ``transformer.h.3``,
``blocks.3``); a node outside every layer joins the segment of its latest input, so a
residual add written in the parent module still lands in the right layer, and the
nodes after the last layer (final norm, LM head) form the epilogue.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch.fx as fx

from ...errors import PassError
from ...rewrite.graph import module_path, op_name
from .seq_axis import SKIPPED

_NUMBERED = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


@dataclass
class Segment:
    name: str
    nodes: list[fx.Node] = field(default_factory=list)
    inputs: list[fx.Node] = field(default_factory=list)   # gradient-path values from earlier segments
    outputs: list[fx.Node] = field(default_factory=list)  # values later segments (or the loss) use


def gradient_nodes(gm: fx.GraphModule, trainable: set[str]) -> set[fx.Node]:
    """Nodes whose value depends on a trained parameter (get_attr target in ``trainable``)."""
    grad: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) in trainable:
            grad.add(node)
        elif node.op == "call_function" and any(i in grad for i in node.all_input_nodes):
            grad.add(node)
    return grad


def layer_prefix(nodes: list[fx.Node]) -> str | None:
    """The module list holding the repeated blocks: the prefix with most numbered children."""
    children: dict[str, set[str]] = defaultdict(set)
    for node in nodes:
        m = _NUMBERED.match(module_path(node))
        if m:
            children[m.group(1)].add(m.group(2))
    if not children:
        return None
    return max(children, key=lambda p: (len(children[p]), -len(p)))


def weight_only(gm: fx.GraphModule) -> set[fx.Node]:
    """Ops computed from weights and constants alone (Gemma's ``1 + w`` norm scale): no
    segment owns them, each chunk program that reads one recomputes it."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and all(i.op == "get_attr" or i in out for i in node.all_input_nodes):
            out.add(node)
    return out


def partition(gm: fx.GraphModule, grad: set[fx.Node], output: fx.Node) -> list[Segment]:
    static = weight_only(gm)
    calls = [n for n in gm.graph.nodes if n in grad and n.op == "call_function" and n not in static
             and n.target not in SKIPPED]  # metadata asserts compute nothing
    prefix = layer_prefix(calls)
    layer_ids: list[str] = []
    if prefix is not None:
        pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)(?:\.|$)")
        for node in calls:
            m = pat.match(module_path(node))
            if m and m.group(1) not in layer_ids:
                layer_ids.append(m.group(1))
    else:
        pat = None
    n_layers = len(layer_ids)
    # Ops without a module path (views, attention, residual adds of a re-exported
    # program) that feed the last layer's own ops belong to it, not to the epilogue.
    last = layer_ids[-1] if layer_ids else None
    feeds_last: set[fx.Node] = set()
    for node in reversed(calls):
        for user in node.users:
            m = pat.match(module_path(user)) if pat else None
            if user in feeds_last or (m and m.group(1) == last):
                feeds_last.add(node)
                break
    seg_of: dict[fx.Node, int] = {}
    for node in calls:
        inputs = [seg_of[i] for i in node.all_input_nodes if i in seg_of]
        latest = max(inputs, default=0)
        m = pat.match(module_path(node)) if pat else None
        if m:
            seg = 1 + layer_ids.index(m.group(1))
            if latest > seg:
                raise PassError(f"stream-bp: {op_name(node)} at {module_path(node)} uses a value "
                                "computed by a later layer",
                                "layers must run in order; stream-bp cannot chunk this model")
        else:
            seg = n_layers + 1 if latest == n_layers and n_layers and node not in feeds_last else latest
        seg_of[node] = seg
    if output not in seg_of:
        raise PassError("stream-bp: the model output does not depend on any trained parameter",
                        "mark at least one parameter requires_grad=True")
    segments = [Segment("prologue")] + [Segment(f"{prefix}.{i}") for i in layer_ids] + \
        [Segment("epilogue")]
    for node in calls:
        segments[seg_of[node]].nodes.append(node)
    for node in calls:
        for user in node.users:
            if user in seg_of and seg_of[user] != seg_of[node]:
                seg = segments[seg_of[user]]
                if node not in seg.inputs:
                    seg.inputs.append(node)
                if node not in segments[seg_of[node]].outputs:
                    segments[seg_of[node]].outputs.append(node)
    segments[seg_of[output]].outputs.append(output)
    return [s for s in segments if s.nodes]
