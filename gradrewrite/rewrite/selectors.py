"""Selectors pick layers by op type, module path glob or regex.

Text forms (CLI and recipes): ``op:linear|conv``, ``path:features.*``, ``re:head|blocks\\.1``;
a bare word is an op kind. A selector that matches nothing raises, naming what exists.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable

import torch.fx as fx

from ..errors import ConfigError
from .graph import Graph, OP_KINDS, iter_module_paths, module_path, op_kind, op_name


@dataclass(frozen=True)
class Selector:
    ops: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    # -------------------------------------------------------------- construction
    @classmethod
    def all_of(cls, *ops: str) -> "Selector":
        """Every node whose op kind (``conv``, ``linear``) or op name is in ``ops``."""
        return cls(ops=tuple(ops))

    @classmethod
    def path(cls, *globs: str) -> "Selector":
        return cls(paths=tuple(globs))

    @classmethod
    def regex(cls, *patterns: str) -> "Selector":
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ConfigError(f"bad selector regex {p!r}: {exc}", "fix the pattern") from exc
        return cls(regexes=tuple(patterns))

    @classmethod
    def parse(cls, text: "str | Selector") -> "Selector":
        if isinstance(text, Selector):
            return text
        kind, colon, body = str(text).partition(":")
        if not colon:
            kind, body = "op", str(text)
        items = tuple(x.strip() for x in body.split("|") if x.strip())
        if not items:
            raise ConfigError(f"empty selector {text!r}", "write op:linear, path:features.* or re:REGEX")
        if kind == "op":
            return cls.all_of(*items)
        if kind == "path":
            return cls.path(*items)
        if kind == "re":
            return cls.regex(body)
        raise ConfigError(f"unknown selector kind {kind!r} in {text!r}",
                          "use op:KIND, path:GLOB or re:REGEX")

    def __or__(self, other: "Selector") -> "Selector":
        return Selector(self.ops + other.ops, self.paths + other.paths,
                        self.regexes + other.regexes, self.exclude + other.exclude)

    def excluding(self, *globs: str) -> "Selector":
        return Selector(self.ops, self.paths, self.regexes, self.exclude + tuple(globs))

    def text(self) -> str:
        parts = []
        if self.ops:
            parts.append("op:" + "|".join(self.ops))
        if self.paths:
            parts.append("path:" + "|".join(self.paths))
        if self.regexes:
            parts.append("re:" + "|".join(self.regexes))
        return " or ".join(parts) or "(nothing)"

    # -------------------------------------------------------------- matching
    def matches(self, node: fx.Node) -> bool:
        if node.op != "call_function":
            return False
        path = module_path(node)
        if any(fnmatch.fnmatchcase(path, g) for g in self.exclude):
            return False
        if self.ops and (op_kind(node) in self.ops or op_name(node) in self.ops):
            # An op selector combined with paths narrows to those paths.
            if not (self.paths or self.regexes):
                return True
            return self._path_ok(path)
        if not self.ops and self._path_ok(path):
            return True
        return False

    def _path_ok(self, path: str) -> bool:
        return (any(fnmatch.fnmatchcase(path, g) for g in self.paths)
                or any(re.search(r, path) for r in self.regexes))

    def select(self, graph: Graph, *, within: Iterable[fx.Node] | None = None,
               what: str = "") -> list[fx.Node]:
        """Matching nodes in graph order; raises ConfigError when there are none."""
        pool = list(within) if within is not None else graph.call_nodes()
        hits = [n for n in pool if self.matches(n)]
        if not hits:
            kinds = sorted({op_kind(n) for n in pool} & (set(OP_KINDS) | {op_kind(n) for n in pool}))
            paths = [p for p in iter_module_paths(pool) if p][:8]
            raise ConfigError(
                f"selector {self.text()!r}{' for ' + what if what else ''} matches no layer",
                f"this graph has op kinds {', '.join(kinds[:12])} and module paths such as "
                f"{', '.join(paths) or '(none)'}")
        return hits
