"""``torch.compile`` backend ``"gradrewrite"``: rewrite each captured subgraph with our passes.

    import gradrewrite.dynamo  # registers the backend (kept out of ``import gradrewrite``:
                               # importing torch._dynamo costs ~1.5 s)
    fast = torch.compile(model, backend="gradrewrite",
                         options={"passes": "fold-bn,dce", "executor": "ort"})
    with torch.no_grad():
        y = fast(x)

Per subgraph dynamo hands over: module weights (parameters/buffers, which dynamo passes
as graph inputs) are frozen into the graph as constants, the rest is exported with
``torch.export`` into a ``Graph``, the pipeline runs (``run_pipeline``), and the executor
runs the result:

``torch``     the rewritten ``GraphModule`` (eager ATen)
``inductor``  ``torch._inductor.compile_fx.compile_fx`` on the rewritten module
``ort``/``tvm`` an artifact compiled and verified by ``compile_graph`` in a temporary
              directory, run through the backend's runner (numpy in, torch tensors out)

Inference only: weights are read once, at compile time (like inductor's freezing), and
nothing is differentiable. When autograd is on and an input or weight requires grad,
the subgraph runs eagerly. Any failure for one subgraph (export, a pass, the backend)
makes that subgraph run eagerly too; each fallback is one warning on the
``gradrewrite.dynamo`` logger naming the reason. Bad options are an error.

Options: ``passes`` (pipeline string, default none), ``executor`` (default ``torch``),
``backend_options`` (passed to the ort/tvm backend, e.g. ``{"tune_trials": 0}``),
``seed`` (verification seed, default 0), ``verify`` (check each pass numerically,
default True).
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .errors import ConfigError

log = logging.getLogger("gradrewrite.dynamo")

NAME = "gradrewrite"
EXECUTORS = ("torch", "inductor", "ort", "tvm")
OPTIONS: dict[str, Any] = {"passes": None, "executor": "torch", "backend_options": None, "seed": 0,
                           "verify": True}
_STATE = re.compile(r"\._(parameters|buffers)\[")


def check_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Fill defaults; unknown options or executors are a ``ConfigError`` naming the valid ones."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} for torch.compile backend "
                          f"{NAME!r}: {', '.join(unknown)}", f"valid options: {', '.join(OPTIONS)}")
    opts = {**OPTIONS, **options}
    if opts["executor"] not in EXECUTORS:
        raise ConfigError(f"unknown executor {opts['executor']!r}", f"valid executors: {', '.join(EXECUTORS)}")
    if opts["backend_options"] is not None and not isinstance(opts["backend_options"], dict):
        raise ConfigError("backend_options must be a dict", "e.g. {'tune_trials': 0}")
    if opts["backend_options"] and opts["executor"] not in ("ort", "tvm"):
        raise ConfigError(f"backend_options apply to the ort and tvm executors, not {opts['executor']!r}",
                          "drop them or pick executor='ort' / 'tvm'")
    if opts["passes"] is not None and not isinstance(opts["passes"], str):
        raise ConfigError("passes must be a pipeline string", 'e.g. "fold-bn,dce"')
    from .compiler import pipeline_specs
    from .rewrite.pipeline import build_passes

    build_passes(pipeline_specs(opts["passes"], None))  # unknown passes fail here, not per subgraph
    return opts


def gradrewrite_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                        options: dict[str, Any] | None = None, **_: Any) -> Callable:
    """The dynamo backend: returns a callable taking the subgraph's inputs."""
    opts = check_options(options)
    eager = gm.forward
    if torch.is_grad_enabled() and (
            any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
            or any(p.requires_grad for p in gm.parameters())):
        log.warning("gradrewrite: running a subgraph eagerly: autograd is on and it needs gradients "
                    "(the backend is inference-only; wrap the call in torch.no_grad())")
        return eager
    try:
        return _compile(gm, list(example_inputs), opts)
    except Exception as exc:  # noqa: BLE001 - any failure means this subgraph runs eagerly
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        log.warning("gradrewrite: running a subgraph eagerly (executor %s): %s", opts["executor"], reason)
        return eager


def _compile(gm: fx.GraphModule, example_inputs: list[Any], opts: dict[str, Any]) -> Callable:
    from .compiler import run_pipeline
    from .rewrite.graph import Graph

    if not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise ValueError("the subgraph takes non-tensor (symbolic) inputs; compile with dynamic=False")
    frozen, user_idx = _freeze_weights(gm, example_inputs)
    user_inputs = tuple(example_inputs[i] for i in user_idx)
    ep = torch.export.export(frozen, user_inputs, strict=False)
    graph = Graph.from_exported_program(ep, user_inputs, source="<torch.compile subgraph>")
    if opts["passes"]:
        run_pipeline(graph, opts["passes"], seed=int(opts["seed"]), verify=bool(opts["verify"]))
    executor = opts["executor"]
    if executor == "torch":
        fn = graph.gm
    elif executor == "inductor":
        from torch._inductor.compile_fx import compile_fx

        fn = compile_fx(graph.gm, list(user_inputs))
    else:
        fn = _artifact_runner(graph, executor, opts)

    def run(*args: Any):
        out = fn(*(args[i] for i in user_idx))
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)

    return run


def _freeze_weights(gm: fx.GraphModule, example_inputs: list[Any]) -> tuple[fx.GraphModule, list[int]]:
    """Dynamo passes module parameters/buffers as inputs: make them constants of a copy of gm.

    Returns the copy and the positions of the remaining (user) inputs.
    """
    gm = fx.GraphModule(gm, gm.graph.__deepcopy__())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user_idx: list[int] = []
    first_op = next((n for n in gm.graph.nodes if n.op != "placeholder"), None)
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        grapharg = node.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", "")
        source = source() if callable(source) else str(source or "")
        if not _STATE.search(source):
            user_idx.append(i)
            continue
        attr = f"_gr_frozen_{i}"
        gm.register_buffer(attr, value.detach())
        with gm.graph.inserting_before(first_op):
            const = gm.graph.get_attr(attr)
        const.meta.update({k: v for k, v in node.meta.items() if k in ("example_value", "val")})
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm, user_idx


def _artifact_runner(graph, executor: str, opts: dict[str, Any]) -> Callable:
    """compile_graph (lowering + verification) into a temp dir; load its runner; drop the dir."""
    from .backends.base import get_backend
    from .compiler import Artifact, CompileOptions, compile_graph

    tmp = Path(tempfile.mkdtemp(prefix="gradrewrite-dynamo-"))
    try:
        art = compile_graph(graph, tmp / "artifact", CompileOptions(
            backend=executor, seed=int(opts["seed"]), verify_each_pass=False, latency_runs=0,
            verify_inputs=1, backend_options=dict(opts["backend_options"] or {}), force=True))
        report = Artifact(art.path).report
        runner = get_backend(executor).load(art.path, report["artifact"])  # files are in memory after this
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(a) for a in runner(*(t.detach().cpu().numpy() for t in inputs))]

    return run


def register() -> None:
    """Register the ``"gradrewrite"`` torch.compile backend (idempotent)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if NAME not in _BACKENDS:
        register_backend(gradrewrite_backend, name=NAME)


register()

__all__ = ["EXECUTORS", "OPTIONS", "check_options", "gradrewrite_backend", "register"]
