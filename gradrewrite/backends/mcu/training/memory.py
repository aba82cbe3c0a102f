"""The memory a training step takes on the device, planned as the compile plans it.

``plan_train_memory(graph)`` lowers the step (no C written, nothing compiled) and plans
its arena with the code generator's own planner (``plan_step_arena``, which
``codegen.write_train_project`` uses too), so its numbers are the artifact's:
``arena_bytes`` is ``MODEL_ARENA_BYTES`` (activations, gradients and, for an int8 step,
the int8 input, which lives in the arena unless a patched first stage reads it window by
window: ``input_in_arena``), ``trained_weights_bytes`` the trained
parameters and optimizer state as stored (int8 weights and int32 biases of an int8
step, only the trained rows of a partial-channel layer), ``labels_bytes`` the labels the
harness holds. ``sram_bytes`` is their sum: what the model owns in SRAM. A device
image adds the harness's own statics, the C library's heap and the stack: the
``device`` entry of report.json's ``memory_plan`` reads the model's part back from the
linked train.elf (it equals ``sram_bytes``) and, with a QEMU run, the SRAM measured.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from ....errors import BackendError
from ....rewrite.graph import Graph
from ..inference.codegen import ArenaPlan, plan_arena
from ..inference.lowering.base import Unsupported
from .patches import DEFAULT_MAX_OVERHEAD, lower_step
from .lowering.buffers import TrainProgram


def plan_step_arena(tp: TrainProgram) -> ArenaPlan:
    """The step's one arena (the input is in it); the trained parameters join the
    program's arrays of their own (``consts``: weights.c), once, before it is planned."""
    prog = tp.program
    prog.consts = [*tp.trained, *prog.consts]
    return plan_arena(prog, inputs=[prog.inputs[0].buf])


def step_memory(tp: TrainProgram, arena: ArenaPlan) -> dict[str, Any]:
    """The memory plan of a step ``plan_step_arena`` planned (module docstring)."""
    prog = tp.program
    trained = sum(b.nbytes for b in tp.trained)
    frozen = sum(b.nbytes for b in prog.consts) - trained
    labels = prog.inputs[1].nbytes
    return {"planner": "mcu", "arena_bytes": arena.plan.arena_bytes,
            "peak_live_bytes": arena.peak_live_bytes,
            "trained_weights_bytes": trained, "trained_arrays": [b.name for b in tp.trained],
            "optimizer_state_bytes": sum(b.nbytes for b in tp.trained if b.state),
            "frozen_weights_bytes": frozen, "input_bytes": prog.inputs[0].nbytes,
            "input_in_arena": not prog.notes.get("input_streamed"),
            "labels_bytes": labels, "sram_bytes": arena.plan.arena_bytes + trained + labels,
            "int8": tp.int8,
            "note": "sram_bytes = arena (activations, gradients, the input) + trained parameters and "
                    "optimizer state + labels, as compiled; the harness, C library heap and stack are "
                    "not in it (see device where the firmware was measured)"}


def plan_train_memory(graph: Graph, patches: str = "auto",
                      patch_overhead: float = DEFAULT_MAX_OVERHEAD) -> dict[str, Any]:
    """The mcu memory plan of a training-step graph without writing or compiling C
    (``patches`` / ``patch_overhead``: as the compile's, ``patches.lower_step``)."""
    try:
        tp = lower_step(graph, patches, patch_overhead)
    except Unsupported as exc:
        raise BackendError(f"the mcu backend cannot generate the training step: {exc}",
                           "change the sparse-update scheme, or use --backend torch") from exc
    return step_memory(tp, plan_step_arena(tp))


def device_memory(plan: dict[str, Any], facts: dict[str, Any], project: str | Path) -> dict[str, Any]:
    """What the linked Cortex-M training image holds, beside the plan: the model's SRAM read
    from train.elf's symbols (the arena, the labels and every trained array: what
    ``sram_bytes`` plans), and with a QEMU run the SRAM measured = linked SRAM less the
    unused stack and heap reserves (stack painting, heap high-water mark)."""
    firmware, runtime = facts["firmware"], facts.get("runtime", {})
    sizes = elf_symbol_sizes(Path(project) / firmware["elf"])
    model = sum(sizes.get(name, 0) for name in ("arena", "label", *plan["trained_arrays"]))
    out: dict[str, Any] = {"elf": firmware["elf"], "model_sram_bytes": model,
                           "model_sram_as_planned": model == plan["sram_bytes"],
                           "sram_linked_bytes": firmware["sram_bytes"]}
    if runtime.get("stack_peak_bytes") is not None:
        measured = (firmware["sram_bytes"] - firmware["stack_reserve_bytes"] - firmware["heap_reserve_bytes"]
                    + runtime["stack_peak_bytes"] + (runtime.get("heap_used_bytes") or 0))
        out.update(sram_measured_bytes=measured, stack_peak_bytes=runtime["stack_peak_bytes"],
                   harness_heap_and_stack_bytes=measured - model)
    return out


def elf_symbol_sizes(elf: Path) -> dict[str, int]:
    """Sizes of an ELF's data symbols (arm-none-eabi-nm -S), by name."""
    proc = subprocess.run(["arm-none-eabi-nm", "-S", str(elf)], capture_output=True, text=True, check=True)
    sizes = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "bBdD":
            sizes[parts[3]] = int(parts[1], 16)
    return sizes
