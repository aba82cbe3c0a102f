"""gradrewrite: compiler-style graph rewriting for PyTorch models.

    import gradrewrite as gr
    graph = gr.load("model.pt2")                     # or gr.capture(model, (x,))
    gr.run_pipeline(graph, "fold-bn,dce")            # rewrite in place
    art = gr.compile(graph, "out/", backend="ort")   # lower, verify, write OUT
    y, = art(x)                                       # run the artifact
    art.report["verification"]
"""
from __future__ import annotations

import dataclasses as _dataclasses
import warnings as _warnings
from pathlib import Path
from typing import Any, Sequence

# torch's pytree deprecation chatter from deepcopy of exported modules is not actionable.
_warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")

from .compiler import Artifact, CompileOptions, compile_graph, run_pipeline  # noqa: E402
from .errors import GradrewriteError  # noqa: E402
from .rewrite.capture import capture, load_model as load  # noqa: E402
from .rewrite.graph import Graph  # noqa: E402
from .rewrite.registry import PassContext, PassResult, register_pass, registered_passes  # noqa: E402
from .rewrite.selectors import Selector  # noqa: E402
from .training import Train  # noqa: E402

__version__ = "0.1.0"


def compile(model: Graph | Any, out: str | Path, *, example_inputs: Sequence[Any] | None = None,
            passes: str | Sequence[Any] | None = None, recipe: str | Path | None = None,
            backend: str = "torch", train: Train | None = None, calibration: Any = None,
            force: bool = False, dynamic_batch: bool = False, console: Any = None, **options: Any) -> Artifact:
    """Capture (if given an ``nn.Module``), rewrite, lower and verify; returns the Artifact.

    One call does what ``gradrewrite compile`` does::

        gr.compile(model, "out", example_inputs=(x,), passes="fold-bn,sparse-update(bias_last=2)",
                   backend="mcu", train=gr.Train(loss="cross_entropy", lr=0.01, momentum=0.9),
                   calibration=samples, target="cortex-m7", ram_kb=256)

    Keywords that are not ``CompileOptions`` fields (``seed``, ``verify_inputs``,
    ``dump_graphs`` ...) are the backend's options (``target``, ``ram_kb``, ``opset``,
    ``tune_trials`` ...; see ``gradrewrite.backends.options``), checked by name and type;
    ``backend_options={...}`` gives them as one dict (per backend for ``auto``). The
    graph passed in is not modified: the pipeline runs on a copy. ``dynamic_batch``:
    capture dim 0 of every input as a symbolic batch (a Graph keeps what it was loaded
    with: ``load(..., dynamic_batch=True)``). ``console``: a ``rich`` console for progress.
    """
    if isinstance(model, Graph):
        if dynamic_batch and not model.dynamic_batch:
            raise GradrewriteError("this Graph was captured with a fixed batch",
                                   "load or capture it with dynamic_batch=True")
        graph = model.clone()
    else:
        if example_inputs is None:
            raise GradrewriteError("example_inputs are needed to capture an nn.Module",
                                   "pass example_inputs=(tensor, ...)")
        if dynamic_batch:  # before the capture, as the CLI does
            from .rewrite.dynamic_batch import refuse
            refuse(backend=backend, train=train is not None)
        graph = capture(model, tuple(example_inputs), dynamic_batch=dynamic_batch)
    fields = {f.name for f in _dataclasses.fields(CompileOptions)}
    backend_options = dict(options.pop("backend_options", None) or {})
    for name in [k for k in options if k not in fields]:
        backend_options[name] = options.pop(name)
    opts = CompileOptions(passes=passes, recipe=recipe, backend=backend, force=force, train=train,
                          calibration=calibration, backend_options=backend_options, **options)
    return compile_graph(graph, out, opts, console=console)


__all__ = ["Artifact", "CompileOptions", "Graph", "GradrewriteError", "PassContext", "PassResult",
           "Selector", "Train", "capture", "compile", "compile_graph", "load", "register_pass",
           "registered_passes", "run_pipeline"]
