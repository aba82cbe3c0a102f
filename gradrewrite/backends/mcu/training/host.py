"""Generate, build and run a training step on the host (the fast check against torch).

``write_train`` lowers a training-step graph and writes the C project with the
``train_main.c`` harness (``harness.py``); ``build_train_host`` compiles it with the
host cc; ``run_train_host`` runs N steps on one batch and returns the loss of every
step and the trained parameters read back from the device arrays;
``make_train_runner`` is the backend's runner for a training-step artifact.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ....errors import BackendError
from ....rewrite.graph import Graph
from ..c_files import template_dir
from ..firmware.build import build_host_pair
from .codegen import write_train_project
from .harness import EXE, HARNESS, HARNESS_DIR
from .patches import DEFAULT_MAX_OVERHEAD, lower_step
from .run import run_training, whole_parameters


def write_train(graph: Graph, project: str | Path, *, source: str = "<model>", patches: str = "auto",
                patch_overhead: float = DEFAULT_MAX_OVERHEAD, stream_input: bool = True) -> dict[str, Any]:
    return write_train_lowered(graph, project, source=source, patches=patches, patch_overhead=patch_overhead,
                               stream_input=stream_input)[0]


def write_train_lowered(graph: Graph, project: str | Path, *, source: str = "<model>", patches: str = "auto",
                        patch_overhead: float = DEFAULT_MAX_OVERHEAD,
                        stream_input: bool = True) -> tuple[dict[str, Any], Graph]:
    """``write_train``, also returning the graph lowered (an int8 step's device form,
    which the integer reference then interprets). ``patches`` / ``patch_overhead``: the
    first stage per patch (``patches.py``; the mcu options of those names), reading its
    input window by window unless ``stream_input`` is False (then the input is in the arena)."""
    project = Path(project)
    program = lower_step(graph, patches, patch_overhead, stream_input)
    facts = write_train_project(program, project, source=source)
    (project / HARNESS_DIR).mkdir(exist_ok=True)
    shutil.copy(template_dir() / HARNESS, project / HARNESS_DIR / HARNESS)
    return facts, program.graph


def build_train_host(project: str | Path) -> Path:
    """The training harness's host executable (and main.c's ``model_host`` beside it, from
    the same objects); returns the training one."""
    return build_host_pair(project, f"{HARNESS_DIR}/{HARNESS}", EXE)[1]


def run_train_host(project: str | Path, x: np.ndarray, labels: np.ndarray, steps: int,
                   lr: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(loss per step, {parameter path: trained value}) after ``steps`` steps on one batch;
    a partially trained parameter comes back as its trained (first) rows only."""
    facts = json.loads((Path(project) / "model.json").read_text())
    x, labels = np.asarray(x), np.asarray(labels)
    n = facts["input"]["shape"][0]
    if x.shape[0] != n or labels.shape[0] != n:
        raise BackendError(f"run_train_host takes one batch of {n}, got {x.shape[0]} inputs and {labels.shape[0]} labels",
                           "check the input and label shapes against model.h")
    run = run_training(project, facts, x, labels, steps, lr, target="host")
    return run.losses, run.params


def make_train_runner(project: str | Path, facts: dict[str, Any]):
    """``(input, labels) -> [loss, *updated parameters]``: one step from the parameters
    the project was generated with, in the training graph's output order (what the
    compiler verifies against the torch training step)."""
    def run(x: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
        losses, params = run_train_host(project, x, labels, 1, facts["lr"])
        params = whole_parameters(project, facts, params)  # torch-side values (int8 steps: scaled)
        return [np.asarray(losses[0], np.float32), *(params[p] for p in facts["step_outputs"][1:])]
    return run
