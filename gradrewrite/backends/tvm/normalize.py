"""Pre-import rewrites that make core-ATen graphs importable and buildable by TVM 0.27.

They run on the decomposed ``ExportedProgram`` right before the Relax importer sees it.
Each rule names a pattern TVM mishandles, checks it, and rewrites it into ops with the
same result that TVM does handle; ``normalize`` returns how often each rule fired.

Why these rules: TVM's importer maps ``aten.cumsum``/``aten.cumprod`` to Relax ops that
keep the input dtype (PyTorch promotes bool and small ints to int64), and it maps
``aten.add``/``aten.mul`` on bool tensors to integer arithmetic on ``bool``. Either way
LLVM code generation later stops with ``Check failed: (t.MatchesCode(DLDataTypeCode::
kDLFloat))``, naming no op. Hugging Face Llama hits the first one: its mask code computes
``(position_ids.diff(-1) != 1).cumsum(-1)`` to detect packed sequences.
"""
from __future__ import annotations


import torch
import torch.fx as fx

from ...rewrite.rules import NodeRule, apply_node_rules

aten = torch.ops.aten

_SCANS = (aten.cumsum.default, aten.cumprod.default)
_BOOL_ARITH = {aten.add.Tensor: aten.bitwise_or.Tensor, aten.mul.Tensor: aten.bitwise_and.Tensor}


def _dtype(arg) -> torch.dtype | None:
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _copy_provenance(src: fx.Node, dst: fx.Node) -> None:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn", "from_node"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def _fake_val(target, args, kwargs):
    """The node's ``meta['val']``, computed on the fake tensors of its inputs."""
    from torch._guards import detect_fake_mode

    vals = [a.meta.get("val") for a in args if isinstance(a, fx.Node)]
    mode = detect_fake_mode(vals)
    if mode is None:
        return None
    real = tuple(a.meta["val"] if isinstance(a, fx.Node) else a for a in args)
    with mode:
        return target(*real, **kwargs)


# --------------------------------------------------------------------------- scan dtype
def _check_scan(node: fx.Node) -> str | None:
    if node.target not in _SCANS:
        return "not a cumsum/cumprod"
    src, out = _dtype(node.args[0]), _dtype(node)
    if src is None or out is None:
        return "dtypes unknown"
    if src == out or "dtype" in node.kwargs:
        return "input already has the output dtype"
    return None


def _rewrite_scan(graph: fx.Graph, node: fx.Node) -> None:
    out = _dtype(node)
    with graph.inserting_before(node):
        cast = graph.call_function(aten._to_copy.default, (node.args[0],), {"dtype": out})
    _copy_provenance(node, cast)
    cast.meta["val"] = _fake_val(aten._to_copy.default, (node.args[0],), {"dtype": out})
    node.replace_input_with(node.args[0], cast)


# --------------------------------------------------------------------------- bool arithmetic
def _check_bool_arith(node: fx.Node) -> str | None:
    if node.target not in _BOOL_ARITH:
        return "not add/mul"
    if _dtype(node) != torch.bool:
        return "result is not bool"
    if not all(isinstance(a, fx.Node) and _dtype(a) == torch.bool for a in node.args[:2]):
        return "an operand is not a bool tensor"
    if node.kwargs.get("alpha", 1) not in (1, True):
        return "add with alpha"
    return None


def _rewrite_bool_arith(graph: fx.Graph, node: fx.Node) -> None:
    target = _BOOL_ARITH[node.target]
    node.target = target
    node.kwargs = {}


# --------------------------------------------------------------------------- slice axis
def _check_slice_axis(node: fx.Node) -> str | None:
    if node.target is not aten.slice.Tensor or len(node.args) < 2:
        return "not a slice with a dim"
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if not isinstance(node.args[1], int) or node.args[1] >= 0:
        return "dim is not negative"
    if not isinstance(val, torch.Tensor) or all(isinstance(d, int) for d in val.shape):
        return "static shape (TVM normalises the dim itself)"
    return None


def _rewrite_slice_axis(graph: fx.Graph, node: fx.Node) -> None:
    rank = node.args[0].meta["val"].dim()
    node.args = (node.args[0], node.args[1] + rank, *node.args[2:])


RULES: tuple[NodeRule, ...] = (
    NodeRule("scan-dtype", _check_scan, _rewrite_scan,
             "cast the input of cumsum/cumprod to the output dtype PyTorch promotes to (bool/int32 -> int64); "
             "TVM scans in the input dtype and cannot add bools"),
    NodeRule("bool-arith", _check_bool_arith, _rewrite_bool_arith,
             "add/mul of bool tensors -> bitwise_or/bitwise_and (same truth table); TVM lowers them to "
             "integer arithmetic on bool, which LLVM codegen rejects"),
    NodeRule("slice-axis", _check_slice_axis, _rewrite_slice_axis,
             "slice along a negative dim of a tensor with a symbolic size (a dynamic batch) -> the same dim "
             "counted from the front; TVM slices such tensors with dynamic_strided_slice, which rejects "
             "negative axes"),
)


def normalize(ep: torch.export.ExportedProgram) -> dict[str, int]:
    """Rewrite ``ep``'s graph in place; returns {rule name: times fired}."""
    return apply_node_rules(ep, RULES)


# Ops that compute on their input's dtype: a bool/int input there is what LLVM codegen
# trips over with "MatchesCode(kDLFloat)" when no rule above covered it.
_ARITH_NAMES = ("add", "sub", "mul", "div", "cumsum", "cumprod", "prod", "pow", "neg", "remainder",
                "fmod", "floor_divide")


def non_float_arith(ep: torch.export.ExportedProgram) -> list[fx.Node]:
    """Arithmetic nodes with a bool operand: the usual suspects of a codegen dtype failure."""
    out = []
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target._schema.name.removeprefix("aten::") not in _ARITH_NAMES:
            continue
        if any(_dtype(a) == torch.bool for a in node.args if isinstance(a, fx.Node)):
            out.append(node)
    return out
