"""Write a lowered ``Program`` as a C project: model.h, model.c, weights.h/.c, kernels/.

The arena is planned with ``rewrite/memory_plan.py`` (greedy by size, 16-byte
alignment, in-place reuse for elementwise kernels whose input dies there). Inputs and
outputs are packed: every input's bytes concatenated in order, likewise outputs. The
packed input is an arena buffer too (``model_input_buffer()``), live from the first
step to its last reader, so its bytes are reused afterwards.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ....rewrite.memory_plan import Buffer, MemoryPlan, peak_live_bytes, plan_buffers
from ..c_files import kernel_dir
from ..program import CTYPES, ITEMSIZE, Buf, Program, Val, c_float, c_ints, contiguous_strides

ALIGN = 16
DTYPE_NAMES = {"f32": "float32", "i8": "int8", "i32": "int32", "i64": "int64", "u8": "uint8"}


@dataclass
class ArenaPlan:
    plan: MemoryPlan
    naive_bytes: int            # every tensor its own buffer
    peak_live_bytes: int        # lower bound: max over steps of the live bytes
    two_largest_bytes: int      # lower bound: the two largest tensors live together

    def as_dict(self) -> dict[str, Any]:
        return {"arena_bytes": self.plan.arena_bytes, "naive_bytes": self.naive_bytes,
                "lower_bound_bytes": max(self.peak_live_bytes, self.two_largest_bytes),
                "peak_live_bytes": self.peak_live_bytes, "two_largest_live_bytes": self.two_largest_bytes,
                "strategy": self.plan.strategy, "buffers": len(self.plan.buffers),
                "inplace_reuses": self.plan.as_dict()["inplace_reuses"]}


INPUT_BUFFER = "<model input>"   # the packed model input, planned in the arena (no C name: no clash)


def input_bufs(prog: Program) -> list[Buf]:
    """The buffers of the packed input: model inputs read through ``in_bytes`` (a training
    step's labels come through their own pointer)."""
    return [v.buf for v in prog.inputs if v.buf.kind == "input" and v.buf.expr() == Buf.expr(v.buf)]


def arena_buffers(prog: Program, inputs: list[Buf] | None = None) -> list[Buffer]:
    """Lifetimes in step indices; outputs live to the final copy (step len(steps)). The
    packed input (``inputs``' bytes, copied in before step 0) lives from step 0 to its
    last reader."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, step in enumerate(prog.steps):
        for b in step.writes:
            first.setdefault(id(b), i)
            last[id(b)] = max(last.get(id(b), i), i)
        for b in step.reads:
            last[id(b)] = max(last.get(id(b), i), i)
    end = len(prog.steps)
    for v in prog.outputs:
        last[id(v.buf)] = end
    buffers = []
    inputs = input_bufs(prog) if inputs is None else inputs
    if prog.notes.get("input_streamed"):  # read window by window from the caller's input (patches.py)
        inputs = []
    in_bytes = sum(b.nbytes for b in inputs)
    if in_bytes:
        buffers.append(Buffer(INPUT_BUFFER, in_bytes, 0, max([0] + [last.get(id(b), 0) for b in inputs])))
    for b in prog.arena:
        if id(b) not in first:
            continue  # never written (check mode placeholders)
        inplace = b.inplace_of.name if b.inplace_of is not None and id(b.inplace_of) in first else None
        buffers.append(Buffer(b.name, b.nbytes, first[id(b)], last[id(b)], inplace))
    return buffers


def plan_arena(prog: Program, strategy: str = "greedy-by-size", inputs: list[Buf] | None = None) -> ArenaPlan:
    buffers = arena_buffers(prog, inputs)
    plan = plan_buffers(buffers, strategy=strategy, alignment=ALIGN)
    plan.check()
    naive = sum(-(-b.size // ALIGN) * ALIGN for b in buffers)
    two = 0
    steps = sorted({b.start for b in buffers})
    for s in steps:
        live = [b for b in buffers if b.lives_at(s)]
        # an in-place pair meeting at s shares one storage: count it once
        merged = {x.inplace_of for x in live if x.inplace_of and x.start == s}
        sizes = sorted((b.size for b in live if not (b.name in merged and b.end == s)), reverse=True)
        two = max(two, sum(sizes[:2]))
    return ArenaPlan(plan, naive, peak_live_bytes(buffers), two)


def io_macros(prefix: str, vals: list[Val], quant: list[dict | None] | None = None) -> list[str]:
    lines, offset = [], 0
    for i, v in enumerate(vals):
        lines += [f"#define MODEL_{prefix}{i}_SHAPE {c_ints(v.shape)}",
                  f"#define MODEL_{prefix}{i}_NDIM {len(v.shape)}",
                  f'#define MODEL_{prefix}{i}_DTYPE "{DTYPE_NAMES[v.dtype]}"',
                  f"#define MODEL_{prefix}{i}_OFFSET {offset}",
                  f"#define MODEL_{prefix}{i}_BYTES {v.nbytes}"]
        q = (quant or [None] * len(vals))[i]
        if q:  # the caller quantizes: q = clamp(round(x / scale) + zero_point, -128, 127)
            lines += [f"#define MODEL_{prefix}{i}_SCALE {c_float(q['scale'])}",
                      f"#define MODEL_{prefix}{i}_ZERO_POINT {q['zero_point']}"]
        offset += v.nbytes
    return lines


def input_arena_c(offsets: dict[str, int]) -> list[str]:
    """The arena, ``model_input_buffer`` and the offset of the packed input in the arena."""
    off = offsets.get(INPUT_BUFFER, 0)
    return [f"#define MODEL_INPUT_ARENA_OFFSET {off}", "",
            "static uint8_t arena[MODEL_ARENA_BYTES] __attribute__((aligned(16)));", "",
            "void *model_input_buffer(void) { return arena + MODEL_INPUT_ARENA_OFFSET; }", ""]


def copy_input_c(src: str) -> list[str]:
    """Point ``in_bytes`` at the input's arena slot, copying the caller's bytes there."""
    return ["    const uint8_t *in_bytes = arena + MODEL_INPUT_ARENA_OFFSET;",
            f"    if ({src} != NULL && (const void *){src} != (const void *)in_bytes)",
            f"        memcpy(arena + MODEL_INPUT_ARENA_OFFSET, {src}, MODEL_INPUT_BYTES);"]


INPUT_BUFFER_H = [
    "/* The packed input lives in the arena (it is planned like any tensor, and the arena's",
    "   bytes are reused once the model has read it). A harness may write the input straight",
    "   into model_input_buffer() (MODEL_INPUT_BYTES bytes) and pass that pointer as `in`;",
    "   any other `in` is copied there first. Its contents are clobbered by a run. */",
    "#define MODEL_INPUT_IN_ARENA 1",
    "void *model_input_buffer(void);"]


def model_h(prog: Program, arena: ArenaPlan, weight_bytes: int) -> str:
    in_bytes = sum(v.nbytes for v in prog.inputs)
    out_bytes = sum(v.nbytes for v in prog.outputs)
    return "\n".join([
        "/* Generated by gradrewrite (mcu backend). */",
        "#ifndef GRADREWRITE_MODEL_H", "#define GRADREWRITE_MODEL_H", "",
        "/* Inputs are packed: input 0's bytes, then input 1's, ... in the order below",
        "   (likewise outputs). Every tensor is dense row-major (PyTorch's layout). */",
        f"#define MODEL_NUM_INPUTS {len(prog.inputs)}",
        f"#define MODEL_NUM_OUTPUTS {len(prog.outputs)}",
        f"#define MODEL_INPUT_BYTES {in_bytes}",
        f"#define MODEL_OUTPUT_BYTES {out_bytes}",
        f"#define MODEL_ARENA_BYTES {max(ALIGN, arena.plan.arena_bytes)}",
        f"#define MODEL_WEIGHT_BYTES {weight_bytes}",
        *io_macros("INPUT", prog.inputs, prog.notes.get("input_quantize")),
        *io_macros("OUTPUT", prog.outputs), "", *prog.notes.get("input_h", INPUT_BUFFER_H), "",
        "/* Runs one inference: reads MODEL_INPUT_BYTES from in, writes MODEL_OUTPUT_BYTES",
        "   to out. Returns 0 on success. Not reentrant (one static arena). */",
        "int model_run(const void *in, void *out);", "", "#endif", ""])


def model_c(prog: Program, arena: ArenaPlan, source: str) -> str:
    lines = ["/* Generated by gradrewrite (mcu backend) from " + source.replace("*/", "* /") + ". */",
             "#include <math.h>", "#include <stdint.h>", "#include <stddef.h>", "#include <string.h>",
             '#include "model.h"', '#include "weights.h"', '#include "kernels/gr_kernels.h"', ""]
    for b in prog.arena:
        if b.name in arena.plan.offsets:
            lines.append(f"#define {b.name.upper()}_OFF {arena.plan.offsets[b.name]}")
    lines += [*prog.notes.get("input_c", input_arena_c(arena.plan.offsets)),
              "int model_run(const void *in, void *out) {",
              *prog.notes.get("input_run", copy_input_c("in")),
              "    uint8_t *out_bytes = (uint8_t *)out;",
              "    (void)in_bytes; (void)out_bytes; (void)arena;"]
    for i, step in enumerate(prog.steps):
        lines.append(f"    /* {i}: {step.op}{' @ ' + step.path if step.path else ''} */")
        lines += ["    " + line for line in step.render().splitlines()]
    offset = 0
    for i, v in enumerate(prog.outputs):
        nd = max(1, len(v.shape))
        lines.append(f"    /* output {i} */")
        lines.append(f"    {{ static const int32_t sh[{nd}] = {c_ints(v.shape or (1,))}, "
                     f"ss[{nd}] = {c_ints(v.strides or (1,))}, ds[{nd}] = {c_ints(contiguous_strides(v.shape) or (1,))};")
        lines.append(f"      gr_copy_nd({ITEMSIZE[v.dtype]}, {nd}, sh, {v.ptr()}, ss, out_bytes + {offset}, ds); }}")
        offset += v.nbytes
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def format_array(buf: Buf) -> str:
    data = buf.data.reshape(-1)
    if buf.dtype == "f32":
        items = [v.hex() + "f" if np.isfinite(v) else ("INFINITY" if v > 0 else "(-INFINITY)") if np.isinf(v)
                 else "NAN" for v in data.astype(np.float64).tolist()]
    else:
        items = [str(v) for v in data.tolist()]
        if buf.dtype == "i64":
            items = [f"{v}LL" for v in items]
    per_line = 8 if buf.dtype == "f32" else 16
    rows = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return ",\n    ".join(rows)


def weight_arrays(bufs: list[Buf], mutable: Callable[[Buf], bool] = lambda buf: False) -> tuple[list[str], list[str]]:
    """The weights.h declarations and weights.c definitions of ``bufs``: ``const``
    (flash) arrays, plain (SRAM) ones where ``mutable``."""
    decls, defs = [], []
    for buf in bufs:
        n = max(1, buf.data.size)
        ctype = CTYPES[buf.dtype]
        qual = "" if mutable(buf) else "const "
        decls.append(f"extern {qual}{ctype} {buf.name}[{n}];")
        values = format_array(buf) if buf.data.size else "0"
        defs.append(f"{qual}{ctype} {buf.name}[{n}] = {{\n    {values}\n}};")
    return decls, defs


def weights_files(prog: Program) -> tuple[str, str]:
    header = ["/* Generated by gradrewrite: model constants (flash). */", "#ifndef GRADREWRITE_WEIGHTS_H",
              "#define GRADREWRITE_WEIGHTS_H", "#include <stdint.h>", ""]
    body = ["/* Generated by gradrewrite: model constants, const so they stay in flash. */",
            "#include <math.h>", '#include "weights.h"', ""]
    decls, defs = weight_arrays(prog.consts)
    header += decls + ["", "#endif", ""]
    return "\n".join(header), "\n".join(body + defs) + "\n"


def write_project(prog: Program, project: Path, *, source: str = "<model>") -> dict[str, Any]:
    """Write the C project into ``project`` (created); returns the facts for report.json."""
    arena = plan_arena(prog)
    weight_bytes = sum(b.nbytes for b in prog.consts)
    project.mkdir(parents=True, exist_ok=True)
    (project / "kernels").mkdir(exist_ok=True)
    for name in sorted(prog.kernel_files):
        shutil.copy(kernel_dir() / name, project / "kernels" / name)
    (project / "model.h").write_text(model_h(prog, arena, weight_bytes))
    (project / "model.c").write_text(model_c(prog, arena, source))
    wh, wc = weights_files(prog)
    (project / "weights.h").write_text(wh)
    (project / "weights.c").write_text(wc)
    facts = {
        **arena.as_dict(),
        "weights_bytes": weight_bytes,
        "steps": len(prog.steps),
        "int8_layers": prog.notes.get("int8_layers", 0),
        "nm_layers": prog.notes.get("nm_layers", 0),
        "kernel_files": sorted(prog.kernel_files),
        "inputs": [{"shape": list(v.shape), "dtype": DTYPE_NAMES[v.dtype], "bytes": v.nbytes,
                    **({"quantize": q} if q else {})}
                   for v, q in zip(prog.inputs, prog.notes.get("input_quantize") or [None] * len(prog.inputs))],
        "input_in_arena": not prog.notes.get("input_streamed"),
        **({"patches": prog.notes["patches"]} if prog.notes.get("patches") else {}),
        "outputs": [{"shape": list(v.shape), "dtype": DTYPE_NAMES[v.dtype], "bytes": v.nbytes}
                    for v in prog.outputs],
        "ops": [{"op": s.op, "path": s.path, "kernel": s.kernel, "macs": s.macs,
                 "out_bytes": sum(b.nbytes for b in s.writes)} for s in prog.steps],
    }
    (project / "model.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts
