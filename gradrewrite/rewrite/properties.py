"""Named graph properties that passes require and ensure, checked as code.

Each checker returns ``None`` when the property holds, else a reason naming the
offending nodes by module path. The pass manager runs them around every pass.
"""
from __future__ import annotations

from typing import Callable

from ..errors import ConfigError
from .graph import Graph, module_path, op_kind, op_name, tensor_meta

Checker = Callable[[Graph], "str | None"]
_PROPERTIES: dict[str, Checker] = {}


def graph_property(name: str) -> Callable[[Checker], Checker]:
    def deco(fn: Checker) -> Checker:
        _PROPERTIES[name] = fn
        return fn
    return deco


def check_property(name: str, graph: Graph) -> str | None:
    if name not in _PROPERTIES:
        raise ConfigError(f"unknown graph property {name!r}",
                          f"known properties: {', '.join(sorted(_PROPERTIES))}")
    return _PROPERTIES[name](graph)


def known_properties() -> list[str]:
    return sorted(_PROPERTIES)


def _where(nodes) -> str:
    names = [f"{op_name(n)} at {module_path(n) or '<root>'}" for n in nodes[:3]]
    more = f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
    return ", ".join(names) + more


@graph_property("shapes-known")
def _shapes_known(graph: Graph) -> str | None:
    missing = [n for n in graph.call_nodes()
               if tensor_meta(n)[0] is None and op_name(n) not in ("getitem",)
               and n.meta.get("val") is None]
    return f"no shape for {_where(missing)}" if missing else None


@graph_property("no-dropout")
def _no_dropout(graph: Graph) -> str | None:
    bad = [n for n in graph.call_nodes()
           if op_kind(n) == "dropout" and len(n.args) > 2 and n.args[2]]
    return f"training-mode dropout: {_where(bad)}" if bad else None


@graph_property("eval-mode")
def _eval_mode(graph: Graph) -> str | None:
    """Batch norm uses running statistics (inference form)."""
    bad = []
    for n in graph.call_nodes():
        if op_kind(n) != "batch_norm":
            continue
        if op_name(n) == "aten.batch_norm" and n.args[5]:
            bad.append(n)
        elif op_name(n) in ("aten._native_batch_norm_legit_functional", "aten.native_batch_norm"):
            bad.append(n)
    return f"training-mode batch norm: {_where(bad)}" if bad else None


@graph_property("no-batch-norm")
def _no_batch_norm(graph: Graph) -> str | None:
    bad = [n for n in graph.call_nodes() if op_kind(n) == "batch_norm"]
    return f"batch norm remains: {_where(bad)}" if bad else None


@graph_property("no-dead-code")
def _no_dead_code(graph: Graph) -> str | None:
    dead = [n for n in graph.call_nodes() if not n.users and not n.is_impure()]
    return f"unused nodes: {_where(dead)}" if dead else None


@graph_property("inference-graph")
def _inference_graph(graph: Graph) -> str | None:
    if graph.meta.get("training"):
        return "the graph is a training step (forward+backward+update)"
    return None


@graph_property("training-step")
def _training_step(graph: Graph) -> str | None:
    if not graph.meta.get("train_step"):
        return "it is not a training step (forward+loss+backward+update)"
    return None
