"""Backend interface and registry.

A backend lowers a ``Graph`` into files inside an artifact directory and can load
those files back as a runner: ``runner(*numpy_arrays) -> list[numpy arrays]``.
Backends depend on ``rewrite/`` only, never on passes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import BackendError, ConfigError
from ..rewrite.graph import Graph

Runner = Callable[..., list[np.ndarray]]


@dataclass
class BackendArtifact:
    """What a backend wrote: files (relative to the artifact dir), target, extra facts."""

    files: list[str]
    target: str
    info: dict[str, Any] = field(default_factory=dict)


class Backend:
    name: str = ""

    def availability(self) -> str | None:
        """None when usable here, else the reason (and how to fix it)."""
        return None

    def check_request(self, options: Any, passes: Sequence[Any] = ()) -> None:
        """Refuse, before any slow work, options this machine cannot honour (a device it
        lacks) and pipelines whose output the backend does not take (``passes``: the
        pipeline's pass objects, read by name and configuration only)."""

    def compile(self, graph: Graph, out_dir: Path, *, options: dict[str, Any]) -> BackendArtifact:
        raise NotImplementedError

    def load(self, out_dir: Path, artifact: dict[str, Any]) -> Runner:
        raise NotImplementedError

    def check_artifact(self, runner: Runner, graph: Graph, info: dict[str, Any], *, n_inputs: int,
                       seed: int) -> dict[str, Any] | None:
        """The backend's own check of an artifact against ``graph``, where outputs compared
        by relative error say nothing (e.g. an int8 training step, compared per parameter
        in quantization steps): the verification record, or a VerificationError. None:
        the compiler's relative-error check applies."""
        return None

    def plan_memory(self, graph: Graph, options: Any) -> dict[str, Any] | None:
        """The memory the artifact of ``graph`` will take, planned the way ``compile``
        plans it but without building anything (cheap enough to call per candidate, as
        sparse-update's budget search does); None: the backend has no planner of its own
        for this graph and ``rewrite.memory_plan.memory_report`` stands in."""
        return None


_BACKENDS: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str):
    def deco(cls):
        cls.name = name
        _BACKENDS[name] = cls
        return cls
    return deco


def _load_builtin() -> None:
    from . import mcu, openvino, ort, torch_backend, tvm  # noqa: F401  (registration side effect)


def backend_names() -> list[str]:
    _load_builtin()
    return sorted(_BACKENDS)


def backend_available(name: str) -> bool:
    """Whether a registered backend is usable here (its optional package installed)."""
    _load_builtin()
    return name in _BACKENDS and _BACKENDS[name]().availability() is None


def get_backend(name: str) -> Backend:
    _load_builtin()
    if name not in _BACKENDS:
        raise ConfigError(f"unknown backend {name!r}", f"valid backends: {', '.join(sorted(_BACKENDS))}, or auto "
                          "(build torch, ort, tvm and openvino where installed, keep the fastest correct one)")
    backend = _BACKENDS[name]()
    reason = backend.availability()
    if reason:
        raise BackendError(f"backend {name!r} is not available: {reason}")
    return backend


def reexport(graph: Graph):
    """The rewritten graph as a fresh ExportedProgram, or a BackendError saying a pass
    left it unexportable."""
    try:
        return graph.to_exported_program()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"torch.export could not re-export the rewritten graph: {first}",
                           "run with --debug; the last pass produced an unexportable graph") from exc


def as_numpy(outputs: Sequence[Any]) -> list[np.ndarray]:
    import torch

    return [o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o)
            for o in outputs]
