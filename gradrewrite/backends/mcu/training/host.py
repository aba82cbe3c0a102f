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
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from ....errors import BackendError
from ....rewrite.graph import Graph
from ..c_files import template_dir
from ..firmware.build import NO_CONTRACT
from .codegen import write_train_project
from .harness import EXE, HARNESS, HARNESS_DIR
from .lowering import lower_train
from .run import run_training, whole_parameters


def write_train(graph: Graph, project: str | Path, *, source: str = "<model>") -> dict[str, Any]:
    project = Path(project)
    facts = write_train_project(lower_train(graph), project, source=source)
    (project / HARNESS_DIR).mkdir(exist_ok=True)
    shutil.copy(template_dir() / HARNESS, project / HARNESS_DIR / HARNESS)
    return facts


def build_train_host(project: str | Path) -> Path:
    project = Path(project)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BackendError("no host C compiler (cc) found", "install gcc")
    sources = [project / "model.c", project / "weights.c", project / HARNESS_DIR / HARNESS,
               *sorted((project / "kernels").glob("*.c"))]
    exe = project / EXE
    proc = subprocess.run([cc, "-std=c99", "-O2", NO_CONTRACT, "-Wall", "-Werror", "-I", str(project), "-I",
                           str(project / "kernels"), *map(str, sources), "-lm", "-o", str(exe)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise BackendError(f"the generated training step does not compile: {proc.stderr.strip()[:500]}",
                           "this is a code generator bug; report it")
    return exe


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
