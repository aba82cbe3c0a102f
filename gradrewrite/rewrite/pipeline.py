"""Pipelines as data: ``"fold-bn,quantize(bits=8)"`` or a TOML recipe.

String grammar: ``name[(key=value, ...)]`` separated by commas at the top level.
Values are numbers, true/false, or text; ``a|b`` is a list; quote text containing
commas or parentheses (``select='re:features\\.(3|4)'``).

TOML recipe::

    [[pass]]
    name = "fold-bn"

    [[pass]]
    name = "quantize"
    bits = 8
"""
from __future__ import annotations

import ast
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .registry import make_pass


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: dict[str, Any]

    def text(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.options.items())})"


def parse_pipeline(text: str) -> list[PassSpec]:
    """Split a pipeline string into pass specs (names and raw option values)."""
    specs: list[PassSpec] = []
    for item in _split_top(text, ","):
        item = item.strip()
        if not item:
            continue
        name, paren, rest = item.partition("(")
        name = name.strip()
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ConfigError(f"bad pass name {name!r} in pipeline {text!r}",
                              "write name or name(key=value, ...)")
        options: dict[str, Any] = {}
        if paren:
            if not rest.rstrip().endswith(")"):
                raise ConfigError(f"unclosed '(' after {name!r} in pipeline {text!r}",
                                  "close the option list with ')'")
            for kv in _split_top(rest.rstrip()[:-1], ","):
                if not kv.strip():
                    continue
                key, eq, value = kv.partition("=")
                if not eq or not key.strip():
                    raise ConfigError(f"option {kv.strip()!r} of pass {name!r} is not key=value",
                                      f"write {name}(key=value, ...)")
                options[key.strip()] = _literal(value.strip())
        specs.append(PassSpec(name, options))
    return specs


def load_recipe(path: str | Path) -> list[PassSpec]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist", "check the path")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {str(path)!r} is not valid TOML: {exc}",
                          "fix the syntax (see README: recipes)") from exc
    entries = data.get("pass")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"recipe {str(path)!r} has no [[pass]] entries",
                          'add [[pass]] tables with name = "..."')
    specs = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        name = entry.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"[[pass]] #{i + 1} in {str(path)!r} has no name", 'add name = "..."')
        specs.append(PassSpec(name, entry))
    return specs


def build_passes(specs: list[PassSpec]) -> list[Any]:
    """Instantiate every pass up front so a typo fails before any work is done."""
    return [make_pass(s.name, s.options) for s in specs]


def pass_config(p: Any) -> dict[str, Any]:
    """The options a pass instance runs with, JSON-able."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(p).items()}


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quote or depth:
        raise ConfigError(f"unbalanced quotes or brackets in {text!r}", "check the pipeline string")
    parts.append("".join(cur))
    return parts


def _literal(value: str) -> Any:
    # Quoted text is taken verbatim, so regex backslashes survive ('re:a\.b').
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
