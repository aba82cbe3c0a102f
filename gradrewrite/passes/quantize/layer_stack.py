"""A stack of repeated layers (a transformer's decoder blocks) in a captured graph, and the
graph cut into consecutive spans at its layer boundaries.

Every node keeps the module path it came from (``model.layers.3.self_attn.q_proj``), so
the blocks of a ``ModuleList`` are found from the paths of the layers to quantize: the
prefix (``model.layers``) followed by an integer index under which the most of them sit,
with indices 0..L-1 (L >= 2) each holding the same linears. The cut is by graph order:
the nodes before layer 0's first node, then each layer from its first node up to the
next layer's first, and the nodes after the last layer's last node. Any cut of a
topologically ordered node list into consecutive spans runs correctly span after span;
the module paths only decide where the cuts go, so that what crosses a cut is small (the
hidden state and values every layer reads, such as rotary tables and the attention mask).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch.fx as fx

from ...rewrite.graph import Graph, module_path

_INDEX = re.compile(r"\d+")
_NOT_RUN = ("placeholder", "get_attr", "output")


@dataclass(frozen=True)
class LayerStack:
    prefix: str   # the ModuleList's path, e.g. "model.layers"
    count: int    # layers in it

    def layer_of(self, node: fx.Node) -> int | None:
        """The index of the layer ``node`` belongs to, or None outside the stack."""
        path = module_path(node)
        if not path.startswith(self.prefix + "."):
            return None
        head = path[len(self.prefix) + 1:].split(".", 1)[0]
        return int(head) if _INDEX.fullmatch(head) and int(head) < self.count else None

    def label(self, span: int) -> str:
        """``span``'s name for progress lines: 0 is before the stack, count + 1 after it."""
        if span == 0:
            return f"before {self.prefix}"
        return f"{self.prefix}.{span - 1}" if span <= self.count else f"after {self.prefix}"

    def spans(self, graph: Graph) -> list[list[fx.Node]]:
        """The nodes that compute (no placeholders, weights or output) in ``count + 2``
        consecutive spans: before the stack, one per layer, after it."""
        nodes = [n for n in graph.nodes if n.op not in _NOT_RUN]
        layer = [self.layer_of(n) for n in nodes]
        last = max(i for i, k in enumerate(layer) if k == self.count - 1)
        out: list[list[fx.Node]] = [[] for _ in range(self.count + 2)]
        current = 0
        for i, (n, k) in enumerate(zip(nodes, layer)):
            if i > last:
                current = self.count + 1
            elif k is not None and k + 1 > current:
                current = k + 1
            out[current].append(n)
        return out


def find_layer_stack(graph: Graph, linears: Sequence[fx.Node]) -> tuple[LayerStack | None, str]:
    """The stack of repeated layers that holds the most of ``linears``, or None; and why."""
    members: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for node in linears:
        parts = module_path(node).split(".")
        for j, part in enumerate(parts[1:], 1):
            if _INDEX.fullmatch(part):
                members[".".join(parts[:j])][int(part)].append(".".join(parts[j + 1:]))
    best = None
    for prefix, layers in members.items():
        count = len(layers)
        if count < 2 or sorted(layers) != list(range(count)):
            continue
        if len({tuple(sorted(v)) for v in layers.values()}) != 1:
            continue   # the blocks differ: not one layer repeated
        held = sum(len(v) for v in layers.values())
        if best is None or (held, -len(prefix)) > (best[0], -len(best[1].prefix)):
            best = (held, LayerStack(prefix, count))
    if best is None:
        return None, "no stack of >= 2 repeated layers (ModuleList blocks 0..L-1 with the same linears) holds the linears"
    stack = best[1]
    firsts = {}
    for n in graph.nodes:
        k = stack.layer_of(n) if n.op not in _NOT_RUN else None
        if k is not None:
            firsts.setdefault(k, len(firsts))
    if [k for k, _ in sorted(firsts.items(), key=lambda kv: kv[1])] != list(range(stack.count)):
        return None, f"the layers of {stack.prefix} do not start in index order in the graph"
    return stack, f"{stack.count} repeated layers under {stack.prefix} hold {best[0]} of {len(linears)} linears"


__all__ = ["LayerStack", "find_layer_stack"]
