"""A JSON-able description of a ``Graph``: the one input every renderer reads.

``describe`` walks the FX graph once and records, per node, what it computes
(``target``/``kind``), where in the model it comes from (``module``, ``stack_trace``),
what it produces (``shape``/``dtype``) and how it connects (``args``/``users``).
Renderers and ``diff`` never touch FX objects, so a description can be saved as JSON
and rendered or compared later.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any

import torch
import torch.fx as fx

from ..graph import Graph, is_bn_statistic, module_path, module_type, op_kind, op_name, tensor_meta

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>[^\n]+)\n(?P<code>[^\n]*)')

# Placeholders, compute nodes and the output are drawn; weights are folded into users.
DRAWN_OPS = ("placeholder", "call_function", "output")


def describe(graph: Graph, title: str = "") -> dict:
    """Describe ``graph`` as plain dicts, lists, strings and numbers.

    Keys: ``title``, ``source``, ``inputs``, ``nodes`` (graph order), ``edges``
    (``[src, dst]`` node ids) and ``stats`` (``nodes`` = compute nodes, ``params``,
    ``ops`` = histogram of compute ops). A pass can attach per-node notes as
    ``node.meta["gradrewrite"]`` (a dict); they appear as the node's ``annotations``.
    """
    gm = graph.gm
    nodes: list[dict] = []
    edges: list[list[str]] = []
    for index, node in enumerate(gm.graph.nodes):
        shape, dtype = tensor_meta(node)
        inputs = _unique(node.all_input_nodes)
        entry: dict[str, Any] = {
            "id": node.name,
            "index": index,
            "op": node.op,
            "target": op_name(node),
            "kind": op_kind(node),
            "module": module_path(node),
            "module_type": module_type(node),
            "shape": list(shape) if shape is not None else None,
            "dtype": dtype,
            "args": [n.name for n in inputs],
            "users": [n.name for n in node.users],
            "attrs": _attrs(node),
            "params": 0,
            "stack_trace": _user_frame(node.meta.get("stack_trace")),
            "annotations": _jsonable(node.meta.get("gradrewrite") or {}),
        }
        if node.op == "get_attr":
            entry["attr_path"] = str(node.target)
            # batch-norm statistics are buffers: shown, not counted as parameters
            entry["params"] = 0 if is_bn_statistic(node) else _numel(graph, node)
        elif node.op == "call_function":
            # Weights a compute node reads directly: shown folded into it by renderers.
            entry["weight_params"] = sum(_numel(graph, n) for n in inputs if n.op == "get_attr")
        nodes.append(entry)
        edges.extend([n.name, node.name] for n in inputs)
    return {
        "title": title,
        "source": graph.source,
        "inputs": [{"name": s.name, "shape": list(s.shape),
                    "dtype": str(s.dtype).removeprefix("torch.")} for s in graph.inputs],
        "nodes": nodes,
        "edges": edges,
        "stats": {
            "nodes": graph.node_count(),
            "params": graph.parameter_count(),
            "ops": graph.op_histogram(),
        },
    }


def node_index(desc: dict) -> dict[str, dict]:
    """Node id -> node entry."""
    return {n["id"]: n for n in desc["nodes"]}


def _unique(nodes: list[fx.Node]) -> list[fx.Node]:
    return list(dict.fromkeys(nodes))


def _numel(graph: Graph, node: fx.Node) -> int:
    try:
        value = graph.attr(node)
    except AttributeError:
        return 0
    return int(value.numel()) if isinstance(value, torch.Tensor) else 0


def _attrs(node: fx.Node) -> dict[str, str]:
    """Non-tensor arguments as text, named after the op's schema where possible."""
    if node.op != "call_function":
        return {}
    names: list[str] = []
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        names = [a.name for a in schema.arguments]
    out: dict[str, str] = {}
    for i, arg in enumerate(node.args):
        if _has_node(arg):
            continue
        out[names[i] if i < len(names) else f"arg{i}"] = _fmt(arg)
    for key, arg in node.kwargs.items():
        if not _has_node(arg):
            out[key] = _fmt(arg)
    return out


def _has_node(arg: Any) -> bool:
    if isinstance(arg, fx.Node):
        return True
    if isinstance(arg, (list, tuple)):
        return any(_has_node(a) for a in arg)
    if isinstance(arg, dict):
        return any(_has_node(a) for a in arg.values())
    return False


def _fmt(arg: Any) -> str:
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_fmt(a) for a in arg) + "]"
    if isinstance(arg, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(arg).removeprefix("torch.")
    if isinstance(arg, float) and math.isinf(arg):
        return "inf" if arg > 0 else "-inf"
    return repr(arg)


def _user_frame(trace: Any) -> str | None:
    """The innermost stack frame outside torch itself, as ``file:line in func: code``."""
    if not isinstance(trace, str) or not trace.strip():
        return None
    frames = list(_FRAME.finditer(trace))
    if not frames:
        return trace.strip().splitlines()[-1].strip() or None
    user = [f for f in frames if not os.path.abspath(f["file"]).startswith(_TORCH_DIR)]
    f = (user or frames)[-1]
    return f'{f["file"]}:{f["line"]} in {f["func"].strip()}: {f["code"].strip()}'


def _jsonable(value: Any) -> Any:
    """Annotations as JSON types; anything else becomes its text."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


# ---------------------------------------------------------------- shared label helpers
# Fill colors by op family, shared by the DOT and HTML renderers.
KIND_COLORS = {
    "conv": "#dbeafe", "conv_transpose": "#dbeafe", "linear": "#e0e7ff",
    "matmul": "#e0e7ff", "attention": "#fae8ff", "batch_norm": "#dcfce7",
    "layer_norm": "#dcfce7", "embedding": "#fef9c3", "placeholder": "#e2e8f0",
    "output": "#e2e8f0",
}
_ACTIVATIONS = {"relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh",
                "hardswish", "hardsigmoid", "leaky_relu", "elu", "softmax", "log_softmax",
                "mish", "relu6", "_softmax", "clamp"}
_SHAPE_OPS = {"view", "reshape", "flatten", "permute", "transpose", "t", "unsqueeze",
              "squeeze", "expand", "contiguous", "clone", "slice", "select", "cat", "split",
              "chunk", "getitem", "_unsafe_view", "stack", "to", "_to_copy", "unflatten"}


def kind_color(node: dict) -> str:
    kind = node.get("kind", "")
    if kind in KIND_COLORS:
        return KIND_COLORS[kind]
    if kind in _ACTIVATIONS:
        return "#ffedd5"
    if kind in _SHAPE_OPS:
        return "#f1f5f9"
    if "pool" in kind:
        return "#ccfbf1"
    return "#ffffff"


def short_op(node: dict) -> str:
    """``aten.conv2d`` -> ``conv2d``; placeholders/outputs by role."""
    if node["op"] == "placeholder":
        return node["id"]
    if node["op"] in ("output", "get_attr"):
        return node["op"]
    return node["target"].removeprefix("aten.")


def short_dims(shape: list | None) -> str:
    """``[1, 8, 8, 8]`` -> ``1×8×8×8``; scalars -> ``scalar``; unknown -> ``""``."""
    if shape is None:
        return ""
    return "×".join(str(s) for s in shape) if shape else "scalar"


def weight_summary(node: dict, nodes: dict[str, dict]) -> str:
    """One line for the weights folded into a compute node: ``weight 8×3×3×3 +1``."""
    weights = [nodes[a] for a in node["args"] if a in nodes and nodes[a]["op"] == "get_attr"]
    if not weights:
        return ""
    main = max(weights, key=lambda w: w.get("params", 0))
    leaf = main.get("attr_path", main["id"]).rpartition(".")[2]
    more = f" +{len(weights) - 1}" if len(weights) > 1 else ""
    return f"{leaf} {short_dims(main['shape'])}{more}"
