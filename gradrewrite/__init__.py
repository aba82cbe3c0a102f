"""gradrewrite: compiler-style graph rewriting for PyTorch models.

    import gradrewrite as gr
    graph = gr.load("model.pt2")                     # or gr.capture(model, (x,))
    gr.run_pipeline(graph, "fold-bn,dce")            # rewrite in place
    art = gr.compile(graph, "out/", backend="ort")   # lower, verify, write OUT
    y, = art(x)                                       # run the artifact
    art.report["verification"]
"""
from __future__ import annotations

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

__version__ = "0.1.0"


def compile(model: Graph | Any, out: str | Path, *, example_inputs: Sequence[Any] | None = None,
            passes: str | None = None, recipe: str | Path | None = None, backend: str = "torch",
            force: bool = False, dynamic_batch: bool = False, **options: Any) -> Artifact:
    """Capture (if given an ``nn.Module``), rewrite, lower and verify; returns the Artifact.

    The graph passed in is not modified: the pipeline runs on a copy. ``dynamic_batch``:
    capture dim 0 of every input as a symbolic batch (a Graph keeps what it was loaded
    with: ``load(..., dynamic_batch=True)``).
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
            refuse(backend=backend)
        graph = capture(model, tuple(example_inputs), dynamic_batch=dynamic_batch)
    opts = CompileOptions(passes=passes, recipe=recipe, backend=backend, force=force, **options)
    return compile_graph(graph, out, opts)


__all__ = ["Artifact", "CompileOptions", "Graph", "GradrewriteError", "PassContext", "PassResult",
           "Selector", "capture", "compile", "compile_graph", "load", "register_pass",
           "registered_passes", "run_pipeline"]
