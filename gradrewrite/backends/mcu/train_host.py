"""Generate, build and run a training step on the host (the fast check against torch),
and the training firmware for Cortex-M targets.

``write_train`` lowers a training-step graph and writes the C project with the
``train_main.c`` harness; ``build_train_host`` compiles it with the host cc;
``run_train_host`` runs N steps on one batch and returns the loss of every step and
the trained parameters read back from the device arrays. ``compile_train`` also links
``train.elf`` for cortex-m4/m7 (``firmware.build_train_firmware``) and measures one
step under QEMU (``train_run.run_training``).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BackendError
from ...rewrite.graph import Graph
from .codegen_train import write_train_project
from .firmware import NO_CONTRACT
from .lower_train import lower_train
from .targets import DEFAULT_FLASH_KB, DEFAULT_RAM_KB

HARNESS = "train_main.c"  # one harness for the host executable and train.elf
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
    from .train_run import run_training

    facts = json.loads((Path(project) / "model.json").read_text())
    x, labels = np.asarray(x), np.asarray(labels)
    n = facts["input"]["shape"][0]
    if x.shape[0] != n or labels.shape[0] != n:
        raise BackendError(f"run_train_host takes one batch of {n}, got {x.shape[0]} inputs and {labels.shape[0]} labels",
                           "check the input and label shapes against model.h")
    run = run_training(project, facts, x, labels, steps, lr, target="host")
    return run.losses, run.params


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


def compile_train(graph: Graph, project: str | Path, *, target: str = "host", ram_kb: int = DEFAULT_RAM_KB,
                  flash_kb: int = DEFAULT_FLASH_KB, measure: bool = True) -> dict[str, Any]:
    """The mcu backend's path for a training-step graph: write and host-build the project
    (the training harness, and main.c's inference harness around model_run); for a
    Cortex-M target also link firmware.elf and train.elf within the budget and, with
    ``measure``, run one step under QEMU for its stack and instruction count."""
    from . import firmware
    from .lower import Unsupported
    from .targets import get_target

    get_target(target)
    try:
        facts = write_train(graph, project, source=graph.source)
    except Unsupported as exc:
        raise BackendError(f"the mcu backend cannot generate the training step: {exc}",
                           "use --backend torch for this training step, or change the sparse-update scheme") from exc
    ts = graph.meta["train_step"]
    facts.update(target=target, train_step=True, step_outputs=list(ts["outputs"]))
    build_train_host(project)
    if facts.get("int8"):  # bit for bit against the integer reference, before the slower builds
        from .train_reference import check_int8_step
        facts["int8_check"] = check_int8_step(graph, project, facts)
    firmware.build_host(project)
    if not get_target(target).is_host:
        infer, train = firmware.build_train_firmware(project, target, f"{HARNESS_DIR}/{HARNESS}",
                                                     ram_kb=ram_kb, flash_kb=flash_kb)
        facts["firmware"] = {**train.as_dict(), "inference_image": {
            k: v for k, v in infer.as_dict().items() if k in ("elf", "bin", "flash_bytes", "sram_bytes")}}
        if measure:
            facts["runtime"] = measure_step(graph, project, facts, target)
    (Path(project) / "model.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def measure_step(graph: Graph, project: str | Path, facts: dict[str, Any], target: str) -> dict[str, Any]:
    """One training step of train.elf under QEMU on a seeded random batch: the stack
    high-water mark of model_train_step (stack painting), the harness's, and the exact
    instruction count of the step (QEMU's TB log), per function and per op."""
    from .qemu import per_layer
    from .train_run import run_training

    x, labels = (t.numpy() for t in graph.random_inputs(7))
    stats = run_training(project, facts, x, labels, 1, facts["lr"], target=target, count_instructions=True).stats
    runtime = {k: stats[k] for k in ("stack_step_bytes", "stack_peak_bytes", "stack_reserve_bytes",
                                     "heap_used_bytes", "instructions_per_step") if k in stats}
    runtime["instructions_note"] = ("instructions executed by one model_train_step (QEMU TB log): a proxy "
                                    "for time, not cycles (no pipeline, wait states or caches modelled)")
    runtime["instructions_per_symbol"] = stats["instructions_per_symbol"]
    runtime["instructions_per_layer"] = per_layer(facts["ops"], stats["instructions_per_call"])
    return runtime


def make_train_runner(project: str | Path, facts: dict[str, Any]):
    """``(input, labels) -> [loss, *updated parameters]``: one step from the parameters
    the project was generated with, in the training graph's output order (what the
    compiler verifies against the torch training step)."""
    from .train_run import whole_parameters

    def run(x: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
        losses, params = run_train_host(project, x, labels, 1, facts["lr"])
        params = whole_parameters(project, facts, params)  # torch-side values (int8 steps: scaled)
        return [np.asarray(losses[0], np.float32), *(params[p] for p in facts["step_outputs"][1:])]
    return run
