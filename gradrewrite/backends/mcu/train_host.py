"""Generate, build and run a training step on the host (the fast check against torch).

``write_train`` lowers a training-step graph and writes the C project with the
``train_host.c`` harness; ``build_train_host`` compiles it with the host cc;
``run_train_host`` runs N steps on one batch and returns the loss of every step and
the trained parameters read back from the device arrays.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BackendError
from ...rewrite.graph import Graph
from .codegen_train import write_train_project
from .lower_train import lower_train

HARNESS = "train_host.c"
HARNESS_DIR = "train"  # not in the project root: the Makefile builds every *.c there with main.c
EXE = "train_host"


def write_train(graph: Graph, project: str | Path, *, source: str = "<model>") -> dict[str, Any]:
    project = Path(project)
    facts = write_train_project(lower_train(graph), project, source=source)
    (project / HARNESS_DIR).mkdir(exist_ok=True)
    shutil.copy(Path(str(resources.files(__package__) / "templates" / HARNESS)), project / HARNESS_DIR / HARNESS)
    return facts


def build_train_host(project: str | Path) -> Path:
    project = Path(project)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BackendError("no host C compiler (cc) found", "install gcc")
    sources = [project / "model.c", project / "weights.c", project / HARNESS_DIR / HARNESS,
               *sorted((project / "kernels").glob("*.c"))]
    exe = project / EXE
    proc = subprocess.run([cc, "-std=c99", "-O2", "-Wall", "-Werror", "-I", str(project), "-I",
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
    project = Path(project)
    facts = json.loads((project / "model.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "x.bin").write_bytes(np.ascontiguousarray(x, dtype=facts["input"]["dtype"]).tobytes())
        (t / "y.bin").write_bytes(np.ascontiguousarray(labels, dtype=facts["labels"]["dtype"]).tobytes())
        proc = subprocess.run([str(project / EXE), str(t / "x.bin"), str(t / "y.bin"), str(steps), repr(float(lr)),
                               str(t / "out.bin")], capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise BackendError(f"the training harness failed: {proc.stderr.strip()[:300]}",
                               "check the input and label shapes against model.h")
        raw = (t / "out.bin").read_bytes()
    return decode_train_output(facts, raw, steps)


def decode_train_output(facts: dict[str, Any], raw: bytes, steps: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The harness's output: ``steps`` float32 losses, then each trained parameter's
    bytes in its storage dtype (a partially trained one: its trained rows only)."""
    losses = np.frombuffer(raw, np.float32, count=steps).copy() if len(raw) >= 4 * steps else None
    offset, params = 4 * steps, {}
    for p in facts["trained"]:
        shape = [p["rows"], *p["shape"][1:]] if p.get("rows") is not None else p["shape"]
        dtype = np.dtype(p.get("dtype", "float32"))
        n = int(np.prod(shape, dtype=np.int64))
        if losses is None or offset + n * dtype.itemsize > len(raw):
            break
        params[p["path"]] = np.frombuffer(raw, dtype, count=n, offset=offset).reshape(shape).copy()
        offset += n * dtype.itemsize
    if losses is None or offset != len(raw):
        raise BackendError(f"the training harness wrote {len(raw)} bytes, expected {offset}",
                           "this is a code generator bug; report it")
    return losses, params


def compile_train(graph: Graph, project: str | Path, *, target: str = "host") -> dict[str, Any]:
    """The mcu backend's path for a training-step graph: write and host-build the project
    (the training harness, and main.c's inference harness around model_run)."""
    from . import firmware
    from .lower import Unsupported
    from .targets import get_target

    if not get_target(target).is_host:
        raise BackendError(f"training-step firmware for {target} is not generated yet",
                           "compile the training step with --target host (model_train_step is host-checked)")
    try:
        facts = write_train(graph, project, source=graph.source)
    except Unsupported as exc:
        raise BackendError(f"the mcu backend cannot generate the training step: {exc}",
                           "use --backend torch for this training step, or change the sparse-update scheme") from exc
    ts = graph.meta["train_step"]
    facts.update(target=target, train_step=True, step_outputs=list(ts["outputs"]))
    build_train_host(project)
    firmware.build_host(project)
    (Path(project) / "model.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def make_train_runner(project: str | Path, facts: dict[str, Any]):
    """``(input, labels) -> [loss, *updated parameters]``: one step from the parameters
    the project was generated with, in the training graph's output order (what the
    compiler verifies against the torch training step)."""
    rows_file = Path(project) / "train" / "frozen_rows.npz"
    frozen_rows = dict(np.load(rows_file)) if rows_file.is_file() else {}

    def run(x: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
        losses, params = run_train_host(project, x, labels, 1, facts["lr"])
        for path, rest in frozen_rows.items():  # whole parameters: trained rows, then the flash ones
            params[path] = np.concatenate([params[path].reshape(-1), rest]).reshape(
                next(p["shape"] for p in facts["trained"] if p["path"] == path))
        return [np.asarray(losses[0], np.float32), *(params[p] for p in facts["step_outputs"][1:])]
    return run
