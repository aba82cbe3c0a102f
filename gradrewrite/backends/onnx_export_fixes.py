"""Rewrites applied to the ``ExportedProgram`` right before ``torch.onnx.export`` sees it.

Why ``sdpa-layout``: the ONNX exporter keeps ``aten.scaled_dot_product_attention`` whole
(it has an ONNX translation) and decomposes everything around it. While decomposing, the
kept op's fake output is laid out (batch, seq, heads, dim) in memory, so the usual
``out.transpose(1, 2).contiguous().reshape(b, s, -1)`` looks contiguous already:
``contiguous`` is dropped and ``reshape`` becomes ``view``. The exporter's next pass (type
promotion) re-runs the graph on fake tensors where sdpa's output has plain contiguous
strides; there that ``view`` is illegal and the export stops with "Cannot view a tensor
with shape ..." (torch 2.13; Hugging Face Swin and T5 encoders hit it). Copying sdpa's output to the contiguous layout gives both runs the same
strides; the copy is an ONNX ``Identity`` that the optimizer removes.
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx

from ..rewrite.rules import NodeRule, apply_node_rules

aten = torch.ops.aten

_PROVENANCE = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn", "from_node")


def _check_sdpa(node: fx.Node) -> str | None:
    if node.target is not aten.scaled_dot_product_attention.default:
        return "not scaled_dot_product_attention"
    return None


def _rewrite_sdpa(graph: fx.Graph, node: fx.Node) -> None:
    with graph.inserting_after(node):
        copy = graph.call_function(aten.clone.default, (node,),
                                   {"memory_format": torch.contiguous_format})
    node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    for key in _PROVENANCE:
        if key in node.meta:
            copy.meta[key] = node.meta[key]
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        with getattr(val, "fake_mode", None) or contextlib.nullcontext():
            copy.meta["val"] = val.clone(memory_format=torch.contiguous_format)


RULES: tuple[NodeRule, ...] = (
    NodeRule("sdpa-layout", _check_sdpa, _rewrite_sdpa),
)


def apply(ep: torch.export.ExportedProgram) -> dict[str, int]:
    """Rewrite ``ep``'s graph in place; returns {rule name: times fired}."""
    return apply_node_rules(ep, RULES)
