"""Local rewrites as data: a rule is a ``pattern``, a ``check`` and a ``rewrite``.

Patterns are trees of ``Op`` (an ATen op or op kind with argument patterns), ``Weight``
(a ``get_attr`` parameter) and ``Var`` (anything), each optionally binding a name::

    Op("batch_norm", Op("conv", Var("x"), Weight("w"), Var("b"), name="conv", single_use=True),
       Weight("gamma"), Weight("beta"), Weight("mean"), Weight("var"), name="bn")

``check(graph, m)`` returns ``None`` when the rule applies or a reason why not;
``rewrite(graph, m)`` returns the node that replaces the pattern's root. ``apply_rules``
counts how often each rule fired and why it was skipped, for reports and tests.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from .graph import OP_KINDS, Graph, copy_meta

Match = dict[str, Any]


class Pattern:
    name: str | None = None

    def match(self, value: Any, m: Match) -> bool:
        raise NotImplementedError

    def _bind(self, value: Any, m: Match) -> bool:
        if self.name is None:
            return True
        if self.name in m and m[self.name] is not value:
            return False  # the same name must bind the same value everywhere
        m[self.name] = value
        return True


@dataclass
class Var(Pattern):
    """Matches any argument (node, constant, list or None) and binds it."""

    name: str | None = None

    def match(self, value: Any, m: Match) -> bool:
        return self._bind(value, m)


@dataclass
class Weight(Pattern):
    """Matches a ``get_attr`` node (a parameter or buffer); ``optional`` admits None."""

    name: str | None = None
    optional: bool = False

    def match(self, value: Any, m: Match) -> bool:
        if value is None:
            return self.optional and self._bind(None, m)
        return isinstance(value, fx.Node) and value.op == "get_attr" and self._bind(value, m)


class Op(Pattern):
    """Matches a ``call_function`` node whose target is one of ``ops``.

    ``ops``: op kinds (``"conv"``), ATen overloads, or a tuple of them. Arguments not
    given in the pattern are not checked. ``single_use``: the node must feed only the
    pattern that contains it (so rewriting it does not change other consumers).
    """

    def __init__(self, ops: Any, *args: Pattern, name: str | None = None,
                 single_use: bool = False):
        self.targets = _resolve(ops)
        self.args = args
        self.name = name
        self.single_use = single_use

    def match(self, value: Any, m: Match) -> bool:
        if not (isinstance(value, fx.Node) and value.op == "call_function"
                and value.target in self.targets):
            return False
        if self.single_use and len(value.users) != 1:
            return False
        for i, pat in enumerate(self.args):
            arg = value.args[i] if i < len(value.args) else None
            if not pat.match(arg, m):
                return False
        return self._bind(value, m)

    def __repr__(self) -> str:
        return f"Op({sorted(str(t) for t in self.targets)[0]}...)"


def _resolve(ops: Any) -> frozenset:
    items = ops if isinstance(ops, (tuple, list, set, frozenset)) else (ops,)
    out = set()
    for item in items:
        if isinstance(item, str):
            out.update(OP_KINDS.get(item, ()))
            if item not in OP_KINDS:
                packet = getattr(torch.ops.aten, item)
                out.add(packet.default)
        elif isinstance(item, torch._ops.OpOverloadPacket):
            out.add(item.default)
        else:
            out.add(item)
    return frozenset(out)


@dataclass
class Rule:
    name: str
    pattern: Op
    rewrite: Callable[[Graph, Match], fx.Node]
    check: Callable[[Graph, Match], str | None] = lambda graph, m: None
    doc: str = ""


@dataclass
class RuleStats:
    fired: Counter = field(default_factory=Counter)
    skipped: dict[str, Counter] = field(default_factory=dict)
    where: dict[str, list[str]] = field(default_factory=dict)

    def total(self) -> int:
        return sum(self.fired.values())

    def as_report(self) -> dict[str, Any]:
        return {
            "fired": dict(self.fired),
            "skipped": {rule: dict(reasons) for rule, reasons in self.skipped.items()},
            "where": self.where,
        }


def apply_rules(graph: Graph, rules: Iterable[Rule], *,
                only: Callable[[fx.Node], bool] | None = None,
                stats: RuleStats | None = None) -> RuleStats:
    """Apply each rule at every node it matches, in graph order, once per sweep.

    Sweeps repeat until nothing fires, so rules may enable each other.
    """
    from .graph import module_path

    stats = stats or RuleStats()
    rules = list(rules)
    # Sweeps revisit nodes; a skip is counted once per (rule, node), with its last reason.
    skips: dict[tuple[str, fx.Node], str] = {}
    while True:
        fired_this_sweep = 0
        for node in list(graph.graph.nodes):
            if getattr(node, "_erased", False) or node.op != "call_function":
                continue  # erased by an earlier rewrite in this sweep
            if only is not None and not only(node):
                continue
            for rule in rules:
                m: Match = {}
                if not rule.pattern.match(node, m):
                    continue
                reason = rule.check(graph, m)
                if reason:
                    skips[(rule.name, node)] = reason
                    continue
                skips.pop((rule.name, node), None)
                with graph.graph.inserting_before(node):
                    replacement = rule.rewrite(graph, m)
                if replacement is not node:
                    if "nn_module_stack" not in replacement.meta:
                        copy_meta(node, replacement)
                    node.replace_all_uses_with(replacement)
                    _erase_dead(graph.graph, node)
                stats.fired[rule.name] += 1
                stats.where.setdefault(rule.name, []).append(module_path(replacement))
                fired_this_sweep += 1
                break
        if fired_this_sweep:
            graph.commit()
        # Stop when a sweep changes nothing; a rule that only skips cannot loop.
        if not fired_this_sweep:
            for (rule_name, node), reason in skips.items():
                if not getattr(node, "_erased", False):   # still in the graph: really skipped
                    stats.skipped.setdefault(rule_name, Counter())[reason] += 1
            return stats


def _erase_dead(g: fx.Graph, root: fx.Node) -> None:
    """Erase ``root`` and the inputs that only it used (pure ops)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if node.users or node.op in ("placeholder", "output") or getattr(node, "_erased", False):
            continue
        if node.op == "call_function" and node.is_impure():
            continue
        inputs = [a for a in node.all_input_nodes]
        g.erase_node(node)
        stack.extend(inputs)


__all__ = ["Match", "Op", "Pattern", "Rule", "RuleStats", "Var", "Weight", "apply_rules"]


# ---------------------------------------------------------------- node rules on an ExportedProgram
@dataclass(frozen=True)
class NodeRule:
    """A one-node rewrite a backend applies to the program it lowers (e.g. to work around
    an exporter or importer): ``check(node)`` is None when it applies, else why not."""

    name: str
    check: Callable[[fx.Node], str | None]
    rewrite: Callable[[fx.Graph, fx.Node], None]
    doc: str = ""


def apply_node_rules(ep: torch.export.ExportedProgram, rules: Iterable[NodeRule]) -> dict[str, int]:
    """Rewrite ``ep``'s graph in place, first matching rule per node; {rule name: times fired}."""
    rules = tuple(rules)
    fired: Counter[str] = Counter()
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        for rule in rules:
            if rule.check(node) is None:
                rule.rewrite(graph, node)
                fired[rule.name] += 1
                break
    if fired:
        graph.lint()
        ep.graph_module.recompile()
    return dict(fired)
