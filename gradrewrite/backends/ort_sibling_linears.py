"""One ``MatMulNBits`` for the low-bit layers that read the same input, at batch-1 decode.

q/k/v (and gate/up) read one input. At one input row each ``MatMulNBits`` is a short
call whose dispatch and thread hand-off are a large part of its cost, and with 2 threads
a narrow N splits poorly. Their codes, scales and zero points concatenated along N (at
session load: the file keeps each layer's stored tensors) make one wider call whose
output is split into the layers' outputs: the same integers, scales and accumulation
per output, so the result equals the separate calls.

The outlier term of such a group (``ort_outlier_terms``) is already one vector over the
concatenated outputs: it becomes the wide call's bias as it is, without the split into
each layer's bias.

``fuse(graph, gm)`` rewrites a view of the graph for export (``gm`` may already be one);
the graph itself is untouched.
"""
from __future__ import annotations

import functools
import operator
from typing import Optional

import torch
from torch import fx

from ..rewrite.graph import Graph
from ..rewrite.quant_ops import GROUPWISE_LINEAR, groupwise_linear
from .ort_outlier_terms import OUTLIER_TERMS, one_row, view_of


@torch.library.custom_op("gradrewrite_ort::sibling_linears", mutates_args=())
def sibling_linears(x: torch.Tensor, packed: list[torch.Tensor], scales: list[torch.Tensor],
                    zeros: list[torch.Tensor], biases: list[Optional[torch.Tensor]],
                    joint_bias: Optional[torch.Tensor], bits: int, group: int,
                    in_features: int) -> torch.Tensor:
    """``concat_i(linear_i(x))`` over the last axis, plus ``joint_bias`` (the group's
    outlier term and biases, concatenated) when given."""
    y = torch.cat([groupwise_linear(x, p, s, z, b, None, None, None, bits, group, in_features)
                   for p, s, z, b in zip(packed, scales, zeros, biases)], dim=-1)
    return y if joint_bias is None else y + joint_bias.to(y.dtype)


@sibling_linears.register_fake
def _sibling_linears_fake(x, packed, scales, zeros, biases, joint_bias, bits, group, in_features):
    return x.new_empty((*x.shape[:-1], sum(int(p.shape[0]) for p in packed)))


SIBLING_LINEARS = torch.ops.gradrewrite_ort.sibling_linears.default


# ----------------------------------------------------------------------------- rewrite
def _groups(graph: Graph, gm: fx.GraphModule) -> list[list[fx.Node]]:
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not GROUPWISE_LINEAR:
            continue
        x, values, bits, group, k = node.args[0], node.args[5], node.args[8], node.args[9], node.args[10]
        if bits == 8 or not one_row(x) or (values is not None and graph.attr(values).numel()):
            continue                                   # 8 bits: fp32 MatMul; outliers: the dense form
        groups.setdefault((x, bits, group, k), []).append(node)
    return [m for m in groups.values() if len(m) > 1]


def _joint_term(members: list[fx.Node]) -> Optional[fx.Node]:
    """The outlier term whose split gives exactly these members' biases, in order."""
    biases = [m.args[4] for m in members]
    if not all(isinstance(b, fx.Node) and b.target is operator.getitem for b in biases):
        return None
    split = biases[0].args[0]
    term = split.args[0] if split.target is torch.ops.aten.split_with_sizes.default else None
    if (term is None or term.target is not OUTLIER_TERMS or len(split.args[1]) != len(members)
            or [b.args for b in biases] != [(split, i) for i in range(len(members))]):
        return None
    return term


def fuse(graph: Graph, gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """``gm`` (``graph.gm`` or a view of it) with each group of one-row low-bit layers that
    read the same input replaced by one ``sibling_linears`` node and a split, and how many
    layers it took (0: ``gm`` is returned as it is)."""
    groups = _groups(graph, gm)
    if not groups:
        return gm, 0
    if gm is graph.gm:                                 # the groups found, mapped into a view
        gm, copied = view_of(graph)
        groups = [[copied[m] for m in members] for members in groups]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fused = 0
    for members in groups:
        first = members[0]
        x, bits, group, k = first.args[0], first.args[8], first.args[9], first.args[10]
        term = _joint_term(members)
        biases = [None] * len(members) if term is not None else [m.args[4] for m in members]
        if any(isinstance(b, fx.Node) and b.op != "get_attr" and order[b] > order[first] for b in biases):
            continue                                   # a bias computed after the first layer
        for m in members:                              # stored tensors must precede the wide call
            for a in (*m.args[1:4], m.args[4] if term is None else None):
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    first.prepend(a)
        sizes = [int(graph.attr(m.args[1]).shape[0]) for m in members]
        with gm.graph.inserting_before(first):
            wide = gm.graph.call_function(SIBLING_LINEARS, (x, [m.args[1] for m in members], [m.args[2] for m in members],
                                                            [m.args[3] for m in members], biases, term, bits, group, k))
            parts = gm.graph.call_function(torch.ops.aten.split_with_sizes.default, (wide, sizes, -1))
            outs = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
        for m, out in zip(members, outs):
            out.meta = dict(m.meta)
            m.replace_all_uses_with(out)
            gm.graph.erase_node(m)
        fused += len(members)
    gm.graph.eliminate_dead_code()                     # the term's own split, now unread
    gm.graph.lint()
    gm.recompile()
    return gm, fused


# ----------------------------------------------------------------------------- ONNX
def _translate(x, packed, scales, zeros, biases, joint_bias, bits: int, group: int, in_features: int,
               *, accuracy_level: int = 0):
    from onnxscript import opset18 as op

    from . import ort_quant as q

    sizes = [int(p.shape[0]) for p in packed]
    n_groups = int(packed[0].shape[1])
    codes, zps = zip(*(q.nbits_layout(op, p, z, bits, group, n_groups) for p, z in zip(packed, zeros)))
    bias = joint_bias
    if bias is None and any(b is not None for b in biases):
        bias = op.Concat(*[op.CastLike(b, x) if b is not None
                           else op.CastLike(op.Expand(op.Constant(value_float=0.0), q._ints(op, [n])), x)
                           for b, n in zip(biases, sizes)], axis=0)
    scale = op.Concat(*[op.Reshape(q._at_load(op, s), q._ints(op, [-1])) for s in scales], axis=0)
    return q.matmul_nbits(op, x, op.Concat(*codes, axis=0), scale, op.Reshape(op.Concat(*zps, axis=0), q._ints(op, [-1])),
                          bias, k=int(in_features), n=sum(sizes), group=int(group), accuracy_level=accuracy_level)


def translation_table(*, accuracy_level: int = 0) -> dict:
    """Custom translation for ``torch.onnx.export(custom_translation_table=...)``."""
    return {SIBLING_LINEARS: functools.partial(_translate, accuracy_level=accuracy_level)}


__all__ = ["fuse", "translation_table", "SIBLING_LINEARS", "sibling_linears"]
