"""Passes by name.

A pass is a frozen dataclass (its fields are its options) with a ``run(graph, ctx)``
method returning a ``PassResult``. ``@register_pass("name")`` makes it available to the
CLI, recipes and reports under that one name. ``requires``/``ensures`` name graph
properties (``rewrite/properties.py``) that the pass manager checks before/after.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

from ..errors import ConfigError
from .graph import Graph


@dataclass
class PassContext:
    """What a pass may need beyond the graph: seed, calibration data, progress, logs,
    and the target's memory planner."""

    seed: int = 0
    calibration: Any = None
    progress: Callable[..., Any] | None = None
    log: list[str] = field(default_factory=list)
    # the backend's plan of a graph's memory (Backend.plan_memory; None where it has none)
    memory_planner: Callable[[Graph], dict[str, Any] | None] | None = None
    # the passes the pass manager runs after the current one (set as each pass starts)
    following: tuple = ()

    def info(self, message: str) -> None:
        self.log.append(message)

    def plan_memory(self, graph: Graph) -> dict[str, Any]:
        """The target's memory plan of ``graph`` as it will be compiled: the passes that
        follow the current one run on it first (in place: pass a clone), then the
        backend's planner, or ``rewrite.memory_plan.memory_report`` where it has none.
        A pass or a planner that refuses the graph raises its GradrewriteError."""
        from .memory_plan import memory_report

        for later in self.following:
            later.run(graph, PassContext(seed=self.seed, calibration=self.calibration))
        plan = self.memory_planner(graph) if self.memory_planner is not None else None
        return plan if plan is not None else {"planner": "graph", **memory_report(graph)}


@dataclass
class PassResult:
    """What a pass did: a changed flag and a small JSON-able report."""

    changed: bool
    report: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]]
    ensures: ClassVar[tuple[str, ...]]

    def run(self, graph: Graph, ctx: PassContext) -> PassResult: ...


_REGISTRY: dict[str, type] = {}


def register_pass(name: str, *, requires: tuple[str, ...] = (),
                  ensures: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: register a frozen-dataclass pass under ``name``."""

    def deco(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            cls = dataclass(frozen=True)(cls)
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"pass name {name!r} registered twice")
        cls.name = name
        cls.requires = tuple(requires)
        cls.ensures = tuple(ensures)
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin_passes() -> None:
    from .. import passes

    for info in pkgutil.iter_modules(passes.__path__):
        importlib.import_module(f"{passes.__name__}.{info.name}")


def registered_passes() -> dict[str, type]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def pass_summary(cls: type) -> str:
    """A pass's one-paragraph description: its docstring's first paragraph, joined."""
    doc = (cls.__doc__ or "").strip()
    if doc.startswith(cls.__name__ + "("):  # dataclass's generated signature, not prose
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def pass_options(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each option of a pass class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        type_name = getattr(hints.get(f.name), "__name__", str(hints.get(f.name)))
        out.append((f.name, type_name, default, f.metadata.get("help", "")))
    return out


def make_pass(name: str, options: dict[str, Any] | None = None) -> Any:
    """Instantiate a registered pass, checking every option name and type."""
    passes = registered_passes()
    if name not in passes:
        raise ConfigError(f"unknown pass {name!r}",
                          f"valid passes: {', '.join(passes)} (see `gradrewrite passes`)")
    cls = passes[name]
    options = dict(options or {})
    valid = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in list(options):
        if key not in valid:
            raise ConfigError(f"pass {name!r} has no option {key!r}",
                              f"valid options: {', '.join(valid) or '(none)'}")
        options[key] = _coerce(name, key, options[key], hints.get(key))
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad options for pass {name!r}: {exc}",
                          f"valid options: {', '.join(valid) or '(none)'}") from exc


def _coerce(pass_name: str, key: str, value: Any, hint: Any) -> Any:
    """Convert option text (from a pipeline string) to the declared type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(pass_name, key, value, arg)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint in (int, float):
            if isinstance(value, bool):
                raise ValueError(value)
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return hint(value)
        if hint is str:
            return str(value)
        if origin in (tuple, list) and isinstance(value, str):
            return tuple(v.strip() for v in value.split("|") if v.strip())
        if origin in (tuple, list):
            return tuple(value)
    except (TypeError, ValueError):
        type_name = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"option {key}={value!r} of pass {pass_name!r} is not a valid {type_name}",
                          f"give {key} a {type_name} value") from None
    return value
