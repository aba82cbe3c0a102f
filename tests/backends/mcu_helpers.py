"""Shared helpers for the mcu code generator tests: generate, build on the host, run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradrewrite.backends.mcu.firmware.build import build_host
from gradrewrite.backends.mcu.inference.codegen import write_project
from gradrewrite.backends.mcu.inference.lowering import lower
from gradrewrite.backends.mcu.inference.runner import make_runner
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.graph import Graph


def build_and_run(graph: Graph, tmp: Path, *inputs: torch.Tensor, sparse: bool = True):
    """Generate the C project for ``graph``, build it with the host cc, run it on
    ``inputs``; returns (outputs as tensors, codegen facts)."""
    prog = lower(graph, sparse=sparse)
    project = tmp / "mcu"
    facts = write_project(prog, project, source="test")
    build_host(project)
    runner = make_runner(project, {**facts, "target": "host"})
    outs = runner(*(x.numpy() for x in inputs))
    return [torch.from_numpy(np.asarray(o)) for o in outs], facts


def graph_of(module: torch.nn.Module, *inputs: torch.Tensor) -> Graph:
    return capture(module.eval(), inputs)
