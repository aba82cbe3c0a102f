"""Patch-based execution of a training step's frozen first stage.

The first layers of a CNN training step are usually frozen and save nothing for the
backward (sparse update stops the backward well above them), yet their high-resolution
tensors can set the step's peak SRAM: the input and the first conv's output live
together. This runs that stage patch by patch with the inference backend's planner and C
path (``inference/patches.py``: ``find_stage``, ``patch``, ``patched_macs``, results bit
for bit those of the unpatched kernels); only the choice differs:

- by default (``stream_input``) the step reads its input window by window as patched
  inference does: from the caller's ``input`` or, when that is NULL, through
  ``model_read_input`` (the training harness reads the windows from the batch file), so
  the input is not in the arena (``MODEL_INPUT_STREAMED``); without ``stream_input`` it
  stays in the arena (the harness reads each batch into ``model_input_buffer()``), every
  candidate is planned with it and the windows are read from there;
- a candidate is planned with the whole step's arena (``plan_arena`` over forward,
  backward and update), least recompute first, skipping a candidate whose live bytes
  (or its split's later steps') leave no room to beat the best arena so far by more than
  ``PRUNE_BYTES``; the lowest arena wins, ties going to less recompute; none is taken
  unless it lowers the step's arena (with a streamed input: even plus the whole input, as
  inference's ``auto`` asks).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ....rewrite.graph import Graph
from ....rewrite.memory_plan import peak_live_bytes
from ..inference.codegen import arena_buffers, plan_arena
from ..inference.patches import (DEFAULT_MAX_OVERHEAD, INPUT_C, INPUT_H, MAX_GRID, _elementwise_ok, find_stage,
                                 parse_grid, patch, patched_macs)
from ..program import Program
from .lowering import lower_train
from .lowering.buffers import TrainProgram

# a candidate is planned only when its lower bound (the live bytes of its steps, or of the
# steps after its split) leaves room to beat the best arena so far by more than this
PRUNE_BYTES = 256
# gr_patch_read (and the weak model_read_input it may call) without inference's arena
PATCH_READ_C = [line for line in INPUT_C if not line.startswith("static uint8_t arena[")]


def _arena(prog: Program, trained) -> int:
    """The step's arena as ``memory.plan_step_arena`` plans it (the input in the arena
    unless the program streams it)."""
    view = dataclasses.replace(prog, consts=[*trained, *prog.consts])
    return plan_arena(view, inputs=[prog.inputs[0].buf]).plan.arena_bytes


def patch_step(tp: TrainProgram, mode: str = "auto", max_overhead: float = DEFAULT_MAX_OVERHEAD,
               stream_input: bool = True) -> tuple[TrainProgram, dict[str, Any]]:
    """``tp`` with its first stage run per patch, and a report for model.json. ``mode``:
    ``auto`` (the best candidate when it lowers the step's arena), ``on`` (the best
    candidate), ``off`` (unchanged), ``N`` / ``RxC`` (the best split with that grid)."""
    prog = tp.program
    report: dict[str, Any] = {"mode": mode, "applied": False, "max_overhead": max_overhead}
    if mode == "off":
        return tp, report
    grid = parse_grid(mode)
    x = prog.inputs[0]
    # the planner's view: one input (the labels come through their own pointer, read by the loss only)
    view = dataclasses.replace(prog, inputs=[x], notes=dict(prog.notes))
    base = _arena(prog, tp.trained)
    report["arena_unpatched_bytes"] = base
    stage = find_stage(view)
    if stage is None:
        report["reason"] = "the step does not start with convolutions over its one NCHW input"
        return tp, report
    stage.layers = stage.layers[:tp.forward_steps]
    for i, layer in enumerate(stage.layers):
        if layer.kind == "elementwise" and not _elementwise_ok(layer, stage.geo):
            stage.layers = stage.layers[:i]
            break
    splits = stage.splits(view) if stage.layers else []
    if not splits:
        report["reason"] = "no split point: the first layers' tensors are read after every candidate split"
        return tp, report
    total_macs = sum(s.macs for s in prog.steps)
    tried = []
    for k in splits:
        _, th, tw = stage.geo[id(stage.layers[k - 1].out)]
        grids = [grid] if grid else [(r, c) for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)
                                     if r * c > 1]
        whole = patched_macs(stage, k, (1, 1))
        for g in grids:
            if g[0] <= th and g[1] <= tw:
                tried.append(((patched_macs(stage, k, g) - whole) / max(1, total_macs), -g[0] * g[1], k, g))
    buffers = arena_buffers(view, inputs=[x.buf])
    floor = {k: peak_live_bytes([dataclasses.replace(b, start=max(b.start, k)) for b in buffers if b.end >= k])
             for k in splits}
    best, planned = None, 0
    for overhead, _, k, g in sorted(tried):
        if overhead > max_overhead + 1e-12:
            continue
        if best is not None and floor[k] > best[0][0] - PRUNE_BYTES:
            continue
        p = patch(view, stage, k, g)
        cand = Program(prog.inputs, prog.outputs, p.program.steps, prog.consts, p.program.arena,
                       set(prog.kernel_files), {**prog.notes, **({"input_streamed": True} if stream_input else {})})
        if best is not None and peak_live_bytes(arena_buffers(cand, inputs=[x.buf])) > best[0][0] - PRUNE_BYTES:
            continue
        arena = _arena(cand, tp.trained)
        planned += 1
        if best is None or (arena, overhead) < best[0]:
            best = ((arena, overhead), cand, p, overhead)
    report["candidates_planned"] = planned
    if best is None:
        report["reason"] = f"every candidate recomputes more than {max_overhead:.0%} of the model's MACs"
        return tp, report
    (arena, overhead), cand, p, _ = best
    held = x.nbytes if stream_input else 0   # an application that keeps the whole input in SRAM anyway
    if mode == "auto" and arena + held >= base:
        report["reason"] = (f"the best patched step arena ({arena} B{f' + input {held} B' if held else ''}) is not "
                            f"below the unpatched one ({base} B)")
        return tp, report
    t = stage.layers[p.k - 1]
    report.update({"applied": True, "split_step": p.k, "split_tensor": t.out.name, "split_path": t.step.path,
                   "split_shape": list(stage.geo[id(t.out)]), "grid": list(p.grid),
                   "patches": p.grid[0] * p.grid[1], "arena_bytes": arena, "stage_macs": p.stage_macs,
                   "stage_macs_patched": p.macs, "macs_overhead": round(overhead, 4),
                   "input_in_arena": not stream_input})
    cand.notes["patch_read_c"] = PATCH_READ_C
    if stream_input:
        cand.notes["input_h"] = INPUT_H
    cand.notes["patches"] = report
    added = len(cand.steps) - len(prog.steps)
    return dataclasses.replace(tp, program=cand, forward_steps=tp.forward_steps + added), report


def lower_step(graph: Graph, patches: str = "auto", patch_overhead: float = DEFAULT_MAX_OVERHEAD,
               stream_input: bool = True) -> TrainProgram:
    """``lower_train``, then the first stage per patch where that lowers the arena: the one
    lowering the artifact (``host.write_train_lowered``) and the memory plan
    (``memory.plan_train_memory``) share, so the plan is the artifact's."""
    return patch_step(lower_train(graph), patches, patch_overhead, stream_input)[0]
