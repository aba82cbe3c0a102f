"""The mcu backend's path for a training-step graph: ``model_train_step`` beside
``model_run``, written and built for the host, an int8 step checked bit for bit against
the integer reference (``reference.py``), and for Cortex-M targets ``firmware.elf`` and
``train.elf`` linked within the budget, one step measured under QEMU."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ....errors import BackendError
from ....rewrite.graph import Graph
from ..firmware.build import build_host, build_train_firmware
from ..firmware.qemu import per_layer
from ..inference.lowering.base import Unsupported
from ..targets import DEFAULT_FLASH_KB, DEFAULT_RAM_KB, get_target
from .harness import HARNESS, HARNESS_DIR
from .host import build_train_host, write_train
from .reference import check_int8_step
from .run import run_training


def compile_train(graph: Graph, project: str | Path, *, target: str = "host", ram_kb: int = DEFAULT_RAM_KB,
                  flash_kb: int = DEFAULT_FLASH_KB, measure: bool = True) -> dict[str, Any]:
    """The mcu backend's path for a training-step graph: write and host-build the project
    (the training harness, and main.c's inference harness around model_run); for a
    Cortex-M target also link firmware.elf and train.elf within the budget (while the
    host build of an int8 step is checked against the integer reference) and, with
    ``measure``, run one step under QEMU for its stack and instruction count."""
    get_target(target)
    try:
        facts = write_train(graph, project, source=graph.source)
    except Unsupported as exc:
        raise BackendError(f"the mcu backend cannot generate the training step: {exc}",
                           "use --backend torch for this training step, or change the sparse-update scheme") from exc
    ts = graph.meta["train_step"]
    facts.update(target=target, train_step=True, step_outputs=list(ts["outputs"]))
    with ThreadPoolExecutor(1) as pool:  # main.c's harness, the Cortex-M images and their QEMU run, meanwhile
        device = pool.submit(_other_builds, graph, project, dict(facts), target, ram_kb, flash_kb, measure)
        build_train_host(project)
        if facts.get("int8"):  # bit for bit against the integer reference
            facts["int8_check"] = check_int8_step(graph, project, facts)
    facts.update(device.result())
    (Path(project) / "model.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def _other_builds(graph: Graph, project: str | Path, facts: dict[str, Any], target: str, ram_kb: int,
                  flash_kb: int, measure: bool) -> dict[str, Any]:
    """The host build of main.c around model_run (it writes the Makefile, which a Cortex-M
    build then rewrites for its target); for a Cortex-M target firmware.elf and train.elf
    linked within the budget, and with ``measure`` one step of train.elf under QEMU: the
    ``firmware`` and ``runtime`` entries of model.json."""
    build_host(project)
    if get_target(target).is_host:
        return {}
    infer, train = build_train_firmware(project, target, f"{HARNESS_DIR}/{HARNESS}", ram_kb=ram_kb,
                                        flash_kb=flash_kb)
    out: dict[str, Any] = {"firmware": {**train.as_dict(), "inference_image": {
        k: v for k, v in infer.as_dict().items() if k in ("elf", "bin", "flash_bytes", "sram_bytes")}}}
    if measure:
        out["runtime"] = measure_step(graph, project, facts, target)
    return out


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
