"""Graph -> ExportedProgram -> core ATen -> (normalise) -> Relax IRModule.

The graph is always lowered to core ATen first (``run_decompositions``): that is TVM's
own default and its best-tested path; importing the raw program skips it, and on this
TVM the raw path miscompiles eval-mode ``aten.batch_norm`` (wrong outputs, no error).
Before the importer runs, every call node's op is checked against the importer's
converter table, so a graph with several unsupported ops fails once, listing all of
them with the layers that use them.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ...errors import BackendError
from ...rewrite.graph import Graph, module_path, op_name
from .. import onnx_export_fixes
from ..base import reexport
from .int8_ops import lower_int8
from .int8_relax import converters
from .normalize import normalize


@dataclass
class Imported:
    mod: Any                               # tvm.IRModule with a "main" Relax function
    ep: torch.export.ExportedProgram       # the decomposed, normalised program
    normalized: dict[str, int] = field(default_factory=dict)
    aten_ops: int = 0
    # quantized graphs: {"int8_layers": {"int8-conv": n, ...}, "fp32_weights": {op: n}} (layers
    # lowered to integer compute; quantized layers that run in fp32 with dequantized weights)
    quantized: dict[str, dict[str, int]] = field(default_factory=dict)


class _ConvertError(Exception):
    def __init__(self, node: fx.Node, exc: Exception):
        super().__init__(str(exc))
        self.node, self.exc = node, exc


def converter_key(node: fx.Node) -> str:
    """The name TVM's importer looks a node up by (``amax.default``, ``getitem``)."""
    return getattr(node.target, "__name__", str(node.target))


def _where(nodes: list[fx.Node], limit: int = 4) -> str:
    paths = Counter(module_path(n) or "<root>" for n in nodes)
    items = [p + (f" ({c}x)" if c > 1 else "") for p, c in paths.most_common()]
    more = f", +{len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def unsupported_ops(ep: torch.export.ExportedProgram, convert_map: dict) -> dict[str, list[fx.Node]]:
    """{op name: nodes} for every call node the importer has no converter for."""
    missing: dict[str, list[fx.Node]] = defaultdict(list)
    for node in ep.graph.nodes:
        if node.op == "call_function" and converter_key(node) not in convert_map:
            missing[op_name(node)].append(node)
    return dict(missing)


def unsupported_message(missing: dict[str, list[fx.Node]]) -> str:
    parts = [f"{op} at {_where(nodes)}" for op, nodes in sorted(missing.items())]
    return (f"TVM's PyTorch importer has no converter for {len(missing)} op"
            f"{'s' if len(missing) != 1 else ''} (after core-ATen decomposition): " + "; ".join(parts))


def _exported(graph: Graph) -> torch.export.ExportedProgram:
    ep = reexport(graph)
    # sdpa's traced output layout makes a later reshape a view that decomposed sdpa's layout
    # cannot take (GPT-2 at batch > 1); the ONNX exporter meets the same (onnx_export_fixes)
    onnx_export_fixes.apply(ep)
    try:
        return ep.run_decompositions()
    except Exception as exc:
        raise BackendError(f"core-ATen decomposition failed before the TVM import: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
                           "rewrite the op it names with a pass, or use --backend ort/torch") from exc


def import_graph(graph: Graph) -> Imported:
    """Lower ``graph`` to a Relax module; all user errors come out as one ``BackendError``."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    graph, int8_layers = lower_int8(graph)   # static int8 chains -> integer ops (int8_ops.py)
    ep = _exported(graph)
    importer = ExportedProgramImporter()
    custom, fp32_weights = converters(ep)       # quantized ops -> Relax (int8_relax.py)
    missing = unsupported_ops(ep, {**importer.convert_map, **custom})
    if missing:
        raise BackendError(unsupported_message(missing),
                           "rewrite those layers with a pass (or a custom op the importer knows), "
                           "or use --backend ort / torch")
    fired = normalize(ep)
    # Name the node when a converter fails (TVM's own errors do not).
    used = {converter_key(n) for n in ep.graph.nodes if n.op == "call_function"}
    custom = {key: _attributed(fn) for key, fn in custom.items() if key in used}
    for key in used - set(custom):
        importer.convert_map[key] = _attributed(importer.convert_map[key])
    try:
        if _internal_api_ok(importer):
            mod = importer.from_exported_program(ep, False, True, False, custom or None)
        else:  # the internal signature moved: the public entry point (errors name no node)
            from tvm.relax.frontend.torch import from_exported_program

            mod = from_exported_program(ep, unwrap_unit_return_tuple=True, run_ep_decomposition=False,
                                        custom_convert_map=custom or None)
    except _ConvertError as err:
        node = err.node
        first = str(err.exc).strip().splitlines()
        raise BackendError(f"TVM's importer failed on {op_name(node)} at {module_path(node) or '<root>'} "
                           f"({node.name}): {type(err.exc).__name__}: {first[-1] if first else ''}",
                           "rewrite that layer with a pass, or use --backend ort / torch") from err.exc
    except BackendError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()
        raise BackendError(f"TVM's importer failed: {type(exc).__name__}: {first[-1] if first else ''}",
                           "use --backend ort / torch, or run with --debug for the traceback") from exc
    ops = sum(1 for n in ep.graph.nodes if n.op == "call_function")
    quantized = {"int8_layers": int8_layers, "fp32_weights": dict(sorted(fp32_weights.items()))} \
        if int8_layers or fp32_weights else {}
    return Imported(mod=mod, ep=ep, normalized=fired, aten_ops=ops, quantized=quantized)


def _internal_api_ok(importer) -> bool:
    import inspect

    try:
        names = list(inspect.signature(importer.from_exported_program).parameters)
    except (TypeError, ValueError):
        return False
    return names[:5] == ["exported_program", "keep_params_as_input", "unwrap_unit_return_tuple",
                         "no_bind_return_tuple", "custom_convert_map"]


def _attributed(fn):
    def convert(node, *rest):
        try:
            return fn(node, *rest)
        except _ConvertError:
            raise
        except Exception as exc:
            raise _ConvertError(node, exc) from exc

    return convert
