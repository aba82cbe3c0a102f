"""The mcu backend's path for a training-step graph: ``model_train_step`` beside
``model_run``, written and built for the host, an int8 step checked bit for bit against
the integer reference (``reference.py``), and for Cortex-M targets ``firmware.elf`` and
``train.elf`` linked within the budget, one step measured under QEMU."""
from __future__ import annotations

import json
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ....errors import BackendError
from ....rewrite.graph import Graph
from ..firmware.build import build_train_firmware
from ..firmware.qemu import per_layer
from ..inference.lowering.base import Unsupported
from ..targets import DEFAULT_FLASH_KB, DEFAULT_RAM_KB, get_target
from .harness import HARNESS, HARNESS_DIR
from .host import build_train_host, write_train_lowered
from .reference import check_int8_step
from .run import run_training


def compile_train(graph: Graph, project: str | Path, *, target: str = "host", ram_kb: int = DEFAULT_RAM_KB,
                  flash_kb: int = DEFAULT_FLASH_KB, measure: bool = True, patches: str = "auto",
                  patch_overhead: int = 20) -> dict[str, Any]:
    """The mcu backend's path for a training-step graph: write and host-build the project
    (the training harness, and main.c's inference harness around model_run); for a
    Cortex-M target also link firmware.elf and train.elf within the budget (while the
    host build of an int8 step is checked against the integer reference) and, with
    ``measure``, run one step under QEMU for its stack and instruction count.
    ``patches`` / ``patch_overhead`` (%): the frozen first stage per patch (``patches.py``).
    ``timings`` (report.json, not model.json): where the compile's time went (``PhaseTimer``)."""
    get_target(target)
    timer = PhaseTimer()
    try:
        with timer("lower_and_write"):
            facts, lowered = write_train_lowered(graph, project, source=graph.source, patches=patches,
                                                 patch_overhead=patch_overhead / 100)
    except Unsupported as exc:
        raise BackendError(f"the mcu backend cannot generate the training step: {exc}",
                           "use --backend torch for this training step, or change the sparse-update scheme") from exc
    ts = graph.meta["train_step"]
    facts.update(target=target, train_step=True, step_outputs=list(ts["outputs"]))
    with timer("host_builds"):  # train_host and main.c's model_host, from one set of objects
        build_train_host(project)
    if get_target(target).is_host:
        if facts.get("int8"):
            with timer("int8_reference_check"):
                facts["int8_check"] = check_int8_step(graph, project, facts, device=lowered)
    else:
        with ThreadPoolExecutor(1) as pool:  # the Cortex-M images and their QEMU run, meanwhile
            device = pool.submit(_device_builds, graph, project, dict(facts), target, ram_kb, flash_kb, measure,
                                 timer)
            if facts.get("int8"):  # bit for bit against the integer reference
                with timer("int8_reference_check"):
                    facts["int8_check"] = check_int8_step(graph, project, facts, device=lowered)
        facts.update(device.result())
    (Path(project) / "model.json").write_text(json.dumps(facts, indent=2) + "\n")
    # report.json only: model.json is part of the artifact, whose bytes must not follow the clock
    return {**facts, "timings": timer.report()}


def _device_builds(graph: Graph, project: str | Path, facts: dict[str, Any], target: str, ram_kb: int,
                   flash_kb: int, measure: bool, timer: "PhaseTimer") -> dict[str, Any]:
    """firmware.elf and train.elf linked within the budget (the Cortex-M build rewrites
    the Makefile the host builds wrote, for its target), and with ``measure`` one step of
    train.elf under QEMU: the ``firmware`` and ``runtime`` entries of model.json."""
    with timer("device_build"):
        infer, train = build_train_firmware(project, target, f"{HARNESS_DIR}/{HARNESS}", ram_kb=ram_kb,
                                            flash_kb=flash_kb)
    out: dict[str, Any] = {"firmware": {**train.as_dict(), "inference_image": {
        k: v for k, v in infer.as_dict().items() if k in ("elf", "bin", "flash_bytes", "sram_bytes")}}}
    if measure:
        with timer("qemu_step_measure"):
            out["runtime"] = measure_step(graph, project, facts, target)
    return out


class PhaseTimer:
    """Wall seconds per phase of the compile (phases on the device thread overlap the
    host build and the reference check), and the CPU seconds of the whole backend
    compile: this process (all threads) and the compilers and emulator it waited for."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self.start = time.perf_counter()
        self.cpu0 = _cpu()

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(time.perf_counter() - t0, 2)

    def report(self) -> dict[str, Any]:
        own, children = (round(b - a, 2) for a, b in zip(self.cpu0, _cpu()))
        return {"wall_seconds": round(time.perf_counter() - self.start, 2), "phases_wall_seconds": self.phases,
                "cpu_seconds": {"process": own, "children": children},
                "note": "device_build and qemu_step_measure run beside int8_reference_check"}


def _cpu() -> tuple[float, float]:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def measure_step(graph: Graph, project: str | Path, facts: dict[str, Any], target: str) -> dict[str, Any]:
    """One training step of train.elf under QEMU on a seeded random batch: the stack
    high-water mark of model_train_step (stack painting), the harness's, and the exact
    instruction count of the step (QEMU's TB log), per function and per op."""
    x, labels = (t.numpy() for t in graph.random_inputs(7))
    stats = run_training(project, facts, x, labels, 1, facts["lr"], target=target, count_instructions=True).stats
    runtime = {k: stats[k] for k in ("stack_step_bytes", "stack_peak_bytes", "stack_reserve_bytes",
                                     "heap_used_bytes", "instructions_per_step") if k in stats}
    runtime["instructions_note"] = ("instructions executed by one model_train_step (QEMU TB log): a proxy "
                                    "for time, not cycles (no pipeline, wait states or caches modelled)")
    runtime["instructions_per_symbol"] = stats["instructions_per_symbol"]
    runtime["instructions_per_layer"] = per_layer(facts["ops"], stats["instructions_per_call"])
    return runtime
