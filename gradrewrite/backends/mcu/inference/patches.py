"""Patch-based execution of a CNN's first stage (MCUNetV2's per-patch inference).

The high-resolution first layers of a CNN set its peak SRAM: the input and the first
conv's output live together. Here the first ``k`` kernel steps of a lowered ``Program``
(the *stage*, ending at the *split* tensor) run once per spatial patch of the split
tensor: each patch computes, layer by layer, only the region of every stage tensor that
its output region needs (the receptive field with its halo, clipped to the image), in
small per-patch buffers; the patch's output region is then copied into the split tensor,
the only full-size stage tensor ever stored. The rest of the program is unchanged.

Halos overlap, so the stage recomputes some outputs: the planner tries every valid split
and every R x C grid up to 8 x 8, keeps those whose multiply-accumulates exceed the
unpatched ones by at most ``max_overhead`` (a fraction of the whole model's MACs), plans
their arenas exactly (``codegen.plan_arena``; least recompute first, skipping a candidate
whose live-bytes lower bound cannot beat the best so far) and takes the lowest arena,
ties going to less recompute.

Results are bit for bit those of the unpatched program: a patch's buffer holds the
in-image part of its region only, and the kernels pad from their shape struct, so a
kernel gets ``ph``/``pw`` = the padding on the patch's top/left (0 inside the image) and
the bottom/right padding implied by ``oh``/``ow``; every output sums the same terms in the
same order as in the whole-tensor call. The kernels this needs: every ``gr_conv_shape``
kernel bounds-checks its taps against ``h``/``w`` (``gr_conv2d_*``, the depthwise ``pad``
buffers, ``gr_pw_dw_s8``), which is what this module relies on; steps of other kernels end
the stage.

The model input is read window by window (``gr_patch_read``): from ``in`` when the caller
passes the whole input, else through ``model_read_input(offset, dst, n)``, which the
application provides (a camera's line buffer, a JPEG decoder, a file), so the whole input
need never be in SRAM. The packed input is then not an arena buffer (``model.h`` defines
``MODEL_INPUT_STREAMED`` instead of ``MODEL_INPUT_IN_ARENA``).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..program import ITEMSIZE, Buf, Program, Step, Val, c_ints, contiguous_strides
from .lowering.int8 import pad_plane_bytes, ring_rows_bytes

STRUCT = re.compile(r"gr_conv_shape (\w+) = \{([-\d, ]+)\};")
FIELDS = ("n", "c", "h", "w", "oc", "oh", "ow", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "groups")
CONV_KERNELS = frozenset({"gr_conv2d_s8", "gr_pointwise_s8", "gr_depthwise3x3_s8", "gr_conv2d_f32"})
ELEMENTWISE_KERNELS = frozenset({"gr_add_s8", "gr_add_lut_s8", "gr_binary_f32", "gr_unary_f32"})
MAX_GRID = 8
DEFAULT_MAX_OVERHEAD = 0.2   # recompute: at most 20% more multiply-accumulates than the whole model's

# the C the patched program adds to model.h / model.c (see the module docstring)
INPUT_H = [
    "/* Patch-based execution reads the input window by window and never copies it whole:",
    "   model_run(in, out) reads from `in`, or, when `in` is NULL, calls model_read_input",
    "   (which the application provides) for each run of n bytes at byte `offset` of the",
    "   packed input. It returns 0 on success. */",
    "#define MODEL_INPUT_STREAMED 1",
    "#include <stdint.h>",
    "int model_read_input(uint32_t offset, void *dst, uint32_t n);"]
INPUT_C = [
    "/* the default when the application reads the input itself: model_run(NULL, ...) fails */",
    "__attribute__((weak)) int model_read_input(uint32_t offset, void *dst, uint32_t n) {",
    "    (void)offset; (void)dst; (void)n; return -1; }", "",
    "/* rows r0..r1-1, columns c0..c1-1 of every channel of a [c, h, w] input at byte `base` */",
    "#if defined(__GNUC__) && !defined(__clang__)",
    "#define GR_PATCH_CALL __attribute__((noinline, noclone))  /* one symbol: per-layer counts find it */",
    "#else",
    "#define GR_PATCH_CALL __attribute__((noinline))",
    "#endif",
    "static GR_PATCH_CALL int gr_patch_read(const uint8_t *in, uint32_t base, int32_t item,",
    "        int32_t c, int32_t h, int32_t w, int32_t r0, int32_t r1, int32_t c0, int32_t c1, uint8_t *dst) {",
    "    const uint32_t n = (uint32_t)(c1 - c0) * (uint32_t)item;",
    "    int32_t ch, r;",
    "    for (ch = 0; ch < c; ch++) for (r = r0; r < r1; r++, dst += n) {",
    "        const uint32_t off = base + (((uint32_t)ch * (uint32_t)h + (uint32_t)r) * (uint32_t)w + (uint32_t)c0)",
    "                             * (uint32_t)item;",
    "        if (in != NULL) memcpy(dst, in + off, n);",
    "        else if (model_read_input(off, dst, n) != 0) return -1;",
    "    }",
    "    return 0;",
    "}", "",
    "static uint8_t arena[MODEL_ARENA_BYTES] __attribute__((aligned(16)));", ""]
INPUT_RUN = ["    const uint8_t *in_bytes = (const uint8_t *)in;"]


@dataclass(frozen=True)
class Region:
    """Rows r0..r1-1 and columns c0..c1-1 of a [c, h, w] tensor."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def rows(self) -> int:
        return self.r1 - self.r0

    @property
    def cols(self) -> int:
        return self.c1 - self.c0

    def union(self, o: "Region | None") -> "Region":
        return self if o is None else Region(min(self.r0, o.r0), max(self.r1, o.r1),
                                             min(self.c0, o.c0), max(self.c1, o.c1))


def _span(o0: int, o1: int, s: int, p: int, k: int, d: int, size: int) -> tuple[int, int]:
    """The input rows (clipped to 0..size) that outputs o0..o1-1 of a conv read."""
    return max(0, o0 * s - p), min(size, (o1 - 1) * s - p + (k - 1) * d + 1)


def _in_region(f: dict[str, int], out: Region) -> Region:
    r0, r1 = _span(out.r0, out.r1, f["sh"], f["ph"], f["kh"], f["dh"], f["h"])
    c0, c1 = _span(out.c0, out.c1, f["sw"], f["pw"], f["kw"], f["dw"], f["w"])
    return Region(r0, r1, c0, c1)


def _tile_struct(f: dict[str, int], inp: Region, out: Region) -> dict[str, int]:
    """``f`` for the patch: the kernel reads ``inp`` and writes ``out``; ph/pw are the
    padding left on the patch's top/left (bottom/right: implied by oh/ow)."""
    return {**f, "h": inp.rows, "w": inp.cols, "oh": out.rows, "ow": out.cols,
            "ph": inp.r0 - (out.r0 * f["sh"] - f["ph"]), "pw": inp.c0 - (out.c0 * f["sw"] - f["pw"])}


def _struct_c(name: str, f: dict[str, int]) -> str:
    return f"gr_conv_shape {name} = {{{', '.join(str(f[k]) for k in FIELDS)}}};"


@dataclass
class Layer:
    """One stage step: what it reads and writes and how its regions map."""

    step: Step
    kind: str                                   # conv | elementwise
    inputs: list[Buf]
    out: Buf
    scratch: list[Buf]
    structs: dict[str, dict[str, int]] = field(default_factory=dict)  # struct name -> fields

    def geometry(self) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
        """((c, h, w) read, (c, h, w) written) for conv kinds."""
        if self.kind != "conv":
            return None
        first, last = self.structs[next(iter(self.structs))], self.structs[list(self.structs)[-1]]
        return (first["c"], first["h"], first["w"]), (last["oc"], last["oh"], last["ow"])

    def macs(self, out: Region) -> int:
        """Multiply-accumulates of the step for output region ``out``."""
        total, region = 0, out
        for f in reversed(list(self.structs.values())):
            total += f["oc"] * region.rows * region.cols * (f["c"] // f["groups"]) * f["kh"] * f["kw"]
            region = _in_region(f, region)
        return total

    def code(self, inp: Region, out: Region) -> str:
        code = self.step.code
        if self.kind == "elementwise":
            return code  # the element count is substituted by the caller
        regions, region = {}, out
        for name, f in reversed(list(self.structs.items())):
            i = _in_region(f, region)
            regions[name] = (i, region)
            region = i
        assert region == inp
        for name, f in self.structs.items():
            i, o = regions[name]
            code = code.replace(_struct_c(name, f), _struct_c(name, _tile_struct(f, i, o)))
        return code


def _layer(step: Step) -> Layer | None:
    """``step`` as a stage layer, or None when it cannot run per patch."""
    if not step.writes or any(b.kind != "arena" for b in step.writes):
        return None
    structs = {name: dict(zip(FIELDS, (int(v) for v in body.split(",")))) for name, body in STRUCT.findall(step.code)}
    if any(f["n"] != 1 for f in structs.values()):
        return None
    reads = list(dict.fromkeys(step.reads))
    if step.kernel in CONV_KERNELS and len(structs) == 1 and len(reads) == 1:
        return Layer(step, "conv", reads, step.writes[0], step.writes[1:], structs)
    if step.kernel == "gr_pw_dw_s8" and list(structs) == ["ps", "ds"] and len(reads) == 1:
        ps, ds = structs["ps"], structs["ds"]
        if (ps["kh"], ps["kw"], ps["sh"], ps["sw"], ps["ph"], ps["pw"]) == (1, 1, 1, 1, 0, 0) \
                and (ds["c"], ds["h"], ds["w"]) == (ps["oc"], ps["oh"], ps["ow"]):
            return Layer(step, "conv", reads, step.writes[0], step.writes[1:], structs)
    if step.kernel in ELEMENTWISE_KERNELS and not structs and len(step.writes) == 1 and 1 <= len(reads) <= 2:
        if step.kernel == "gr_binary_f32" and "gr_binary_f32(GR_ADD," not in step.code:
            return None
        return Layer(step, "elementwise", reads, step.writes[0], [])
    return None


def _scratch_bytes(layer: Layer, buf: Buf, out: Region) -> int:
    """A scratch buffer's size for the patch: a depthwise ``pad`` plane and
    ``gr_pw_dw_s8``'s ``ring`` from the kernels' formulas (as ``lowering/int8.py`` sizes
    them), whole planes (``_plane``/``_planes``) scaled to the patch's, any other kept as it
    is (its size depends on channels only, or is an upper bound)."""
    f = layer.structs[list(layer.structs)[-1]]
    tile = _tile_struct(f, *list(_chain(layer, out))[-1])
    if buf.name.endswith("_pad"):
        return pad_plane_bytes(tile["oh"], tile["ow"], tile["sh"], tile["sw"])
    if buf.name.endswith("_ring"):
        return ring_rows_bytes(tile["c"], tile["ow"], tile["w"], tile["sw"], tile["pw"])
    plane = f["h"] * f["w"]
    if buf.name.endswith(("_plane", "_planes")) and buf.nbytes % plane == 0:
        return buf.nbytes // plane * tile["h"] * tile["w"]
    return buf.nbytes


def _chain(layer: Layer, out: Region):
    """(input region, output region) of each struct of ``layer``, first struct first."""
    pairs, region = [], out
    for f in reversed(list(layer.structs.values())):
        i = _in_region(f, region)
        pairs.append((i, region))
        region = i
    return reversed(pairs)


@dataclass
class Stage:
    """The patchable prefix of a program: its layers and the geometry of their tensors."""

    layers: list[Layer]
    geo: dict[int, tuple[int, int, int]]        # id(buf) -> (c, h, w)
    input_buf: Buf

    def splits(self, prog: Program) -> list[int]:
        """Stage lengths k whose last output is the only stage tensor read after the stage."""
        out_ids = {id(v.buf) for v in prog.outputs}
        later_reads: list[set[int]] = []
        acc: set[int] = set(out_ids)
        for step in reversed(prog.steps):
            later_reads.append(set(acc))
            acc |= {id(b) for b in step.reads}
        later_reads.reverse()   # later_reads[i]: buffers read by steps i+1.. or outputs
        ok = []
        for k in range(1, len(self.layers) + 1):
            t = self.layers[k - 1].out
            if id(t) in out_ids or self.geo.get(id(t)) is None or id(self.input_buf) in later_reads[k - 1]:
                continue
            inside = {id(b) for layer in self.layers[:k] for b in [layer.out, *layer.scratch]} - {id(t)}
            if not inside & later_reads[k - 1]:
                ok.append(k)
        return ok


def find_stage(prog: Program) -> Stage | None:
    """The longest prefix of ``prog``'s steps that can run per patch, or None."""
    inputs = [v.buf for v in prog.inputs if v.buf.kind == "input"]
    if len(prog.inputs) != 1 or len(inputs) != 1 or len(prog.inputs[0].shape) != 4 \
            or prog.inputs[0].shape[0] != 1 or not prog.inputs[0].is_contiguous():
        return None
    x = inputs[0]
    geo: dict[int, tuple[int, int, int]] = {id(x): tuple(prog.inputs[0].shape[1:])}
    layers: list[Layer] = []
    for step in prog.steps:
        layer = _layer(step)
        if layer is None or any(id(b) not in geo for b in layer.inputs):
            break
        g = layer.geometry()
        if g is not None:
            if geo[id(layer.inputs[0])] != g[0]:
                break
            out = g[1]
        else:
            shapes = {geo[id(b)] for b in layer.inputs}
            if len(shapes) != 1:
                break
            out = shapes.pop()
        if layer.out.nbytes != math.prod(out) * ITEMSIZE[layer.out.dtype] or id(layer.out) in geo:
            break
        geo[id(layer.out)] = out
        layers.append(layer)
    if not layers or x not in layers[0].inputs:
        return None
    return Stage(layers, geo, x)


def _splits(n: int, parts: int) -> list[tuple[int, int]]:
    b = [round(i * n / parts) for i in range(parts + 1)]
    return [(b[i], b[i + 1]) for i in range(parts)]


def _copy_code(item: int, src: Val, dst: Val) -> str:
    nd = len(src.shape)
    return (f"{{ static const int32_t sh[{nd}] = {c_ints(src.shape)}, ss[{nd}] = {c_ints(src.strides)}, "
            f"ds[{nd}] = {c_ints(dst.strides)};\n"
            f"  gr_copy_nd({item}, {nd}, sh, {src.ptr()}, ss, {dst.out()}, ds); }}")


def _window(buf: Buf, c: int, held: Region, want: Region) -> Val:
    """The ``want`` part of a [c, held.rows, held.cols] buffer, as a strided view."""
    return Val(buf, (c, want.rows, want.cols), (held.rows * held.cols, held.cols, 1),
               (want.r0 - held.r0) * held.cols + (want.c0 - held.c0))


AXES = (("h", "sh", "ph", "kh", "dh"), ("w", "sw", "pw", "kw", "dw"))
Interval = tuple[int, int]


def _axis(layers: list[Layer], lo: int, hi: int, axis: int):
    """Along one axis, for a patch whose split-tensor interval is lo..hi-1: the interval of
    every stage tensor the patch computes (id(buf) -> the hull of what its readers ask), the
    interval each layer reads (layer index -> interval) and the output extent of each of a
    layer's structs (layer index -> extents, first struct first). Regions are boxes and
    every map acts on rows and columns separately: the 2-D regions are their products."""
    size, st, pad, k, d = AXES[axis]
    need: dict[int, Interval] = {id(layers[-1].out): (lo, hi)}
    asks: dict[int, Interval] = {}
    ext: dict[int, list[int]] = {}
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        iv = need.get(id(layer.out))
        if iv is None:
            continue
        spans = []
        for f in reversed(list(layer.structs.values())):
            spans.append(iv[1] - iv[0])
            iv = _span(iv[0], iv[1], f[st], f[pad], f[k], f[d], f[size])
        ext[i], asks[i] = spans[::-1], iv
        for b in layer.inputs:
            old = need.get(id(b))
            need[id(b)] = iv if old is None else (min(old[0], iv[0]), max(old[1], iv[1]))
    return need, asks, ext


def _regions(layers: list[Layer], region: Region) -> tuple[dict[int, Region], dict[int, list[Region]]]:
    """For output ``region`` of the last layer's tensor: the region of every stage tensor a
    patch computes and the region each layer reads (layer index -> one per input)."""
    rows, row_asks, _ = _axis(layers, region.r0, region.r1, 0)
    cols, col_asks, _ = _axis(layers, region.c0, region.c1, 1)
    need = {key: Region(*rows[key], *cols[key]) for key in rows}
    asks = {i: [Region(*row_asks[i], *col_asks[i])] * len(layers[i].inputs) for i in row_asks}
    return need, asks


def patched_macs(stage: Stage, k: int, grid: tuple[int, int]) -> int:
    """The multiply-accumulates of the first ``k`` layers run per patch of ``grid``: per
    struct, (its MACs per output pixel) x (sum of its row extents over the grid's row
    bands) x (sum of its column extents over the column bands)."""
    layers = stage.layers[:k]
    _, th, tw = stage.geo[id(layers[-1].out)]
    sums = []
    for axis, (n, parts) in enumerate(((th, grid[0]), (tw, grid[1]))):
        total: dict[tuple[int, int], int] = {}
        for lo, hi in _splits(n, parts):
            for i, spans in _axis(layers, lo, hi, axis)[2].items():
                for j, e in enumerate(spans):
                    total[i, j] = total.get((i, j), 0) + e
        sums.append(total)
    return sum(f["oc"] * (f["c"] // f["groups"]) * f["kh"] * f["kw"] * sums[0][i, j] * sums[1][i, j]
               for i, layer in enumerate(layers) for j, f in enumerate(layer.structs.values())
               if (i, j) in sums[0])


@dataclass
class Patched:
    program: Program
    k: int
    grid: tuple[int, int]
    macs: int               # the patched stage's multiply-accumulates
    stage_macs: int         # the unpatched stage's


def patch(prog: Program, stage: Stage, k: int, grid: tuple[int, int]) -> Patched:
    """``prog`` with its first ``k`` steps run per patch of a ``grid`` over the split tensor."""
    layers = stage.layers[:k]
    t = layers[-1].out
    tc, th, tw = stage.geo[id(t)]
    item_of = {id(b): ITEMSIZE[b.dtype] for layer in layers for b in [*layer.inputs, layer.out]}
    steps: list[Step] = []
    new_bufs: list[Buf] = []
    macs = 0
    patches = [Region(r0, r1, c0, c1) for r0, r1 in _splits(th, grid[0]) for c0, c1 in _splits(tw, grid[1])]

    def tile(base: Buf, tag: str, nbytes: int) -> Buf:
        b = Buf(f"{base.name}_{tag}", "arena", max(1, nbytes), base.dtype)
        new_bufs.append(b)
        return b

    for pi, region in enumerate(patches):
        tag = f"p{pi}"
        label = f" [patch {pi + 1}/{len(patches)}]"
        need, asks = _regions(layers, region)
        held: dict[int, Buf] = {}
        x = stage.input_buf
        if id(x) in need:
            c, h, w = stage.geo[id(x)]
            r = need[id(x)]
            dst = tile(Buf("patch_in", "arena", 1, x.dtype), tag, c * r.rows * r.cols * item_of[id(x)])
            steps.append(Step("patch input window" + label, "", (
                f"if (gr_patch_read(in_bytes, {x.offset}, {item_of[id(x)]}, {c}, {h}, {w}, {r.r0}, {r.r1}, "
                f"{r.c0}, {r.c1}, (uint8_t *)(void *){dst.expr()}) != 0) return 5;"),
                [x], [dst], "gr_patch_read"))
            held[id(x)] = dst
        for i, layer in enumerate(layers):
            if i not in asks:
                continue
            out = need[id(layer.out)]
            reads = []
            for b, want in zip(layer.inputs, asks[i]):
                c = stage.geo[id(b)][0]
                src = held[id(b)]
                if want != need[id(b)]:  # a smaller window than the buffer holds: copy it out
                    part = tile(b, f"{tag}_{i}w", c * want.rows * want.cols * item_of[id(b)])
                    steps.append(Step("patch window copy" + label, layer.step.path, _copy_code(
                        item_of[id(b)], _window(src, c, need[id(b)], want),
                        Val(part, (c, want.rows, want.cols), contiguous_strides((c, want.rows, want.cols)))),
                        [src], [part], "gr_copy_nd"))
                    src = part
                reads.append(src)
            c = stage.geo[id(layer.out)][0]
            y = tile(layer.out, tag, c * out.rows * out.cols * item_of[id(layer.out)])
            code = layer.code(asks[i][0], out)
            if layer.kind == "elementwise":
                code = _elementwise_code(layer, code, c, out, stage.geo[id(layer.out)])
            scratch = [tile(s, tag, _scratch_bytes(layer, s, out)) for s in layer.scratch]
            for old, new in zip([*layer.inputs, layer.out, *layer.scratch], [*reads, y, *scratch]):
                code = code.replace(old.expr(), new.expr())
            m = layer.macs(out) if layer.kind == "conv" else 0
            macs += m
            steps.append(Step(layer.step.op + label, layer.step.path, code, reads, [y, *scratch],
                              layer.step.kernel, m, dict(layer.step.params)))
            held[id(layer.out)] = y
        part = held[id(t)]
        steps.append(Step("patch output copy" + label, layers[-1].step.path, _copy_code(
            item_of[id(t)], Val(part, (tc, region.rows, region.cols), contiguous_strides((tc, region.rows, region.cols))),
            Val(t, (tc, region.rows, region.cols), (th * tw, tw, 1), region.r0 * tw + region.c0)),
            [part], [t], "gr_copy_nd"))
    stage_macs = sum(layer.macs(Region(0, layer.geometry()[1][1], 0, layer.geometry()[1][2]))
                     for layer in layers if layer.kind == "conv")
    program = Program(prog.inputs, prog.outputs, steps + prog.steps[k:], prog.consts, prog.arena + new_bufs,
                      set(prog.kernel_files), {**prog.notes, "input_h": INPUT_H, "input_c": INPUT_C,
                                               "input_run": INPUT_RUN, "input_streamed": True})
    return Patched(program, k, grid, macs, stage_macs)


def _elementwise_code(layer: Layer, code: str, c: int, out: Region, full: tuple[int, int, int]) -> str:
    """An element-wise kernel's code for a [c, out.rows, out.cols] patch."""
    if layer.step.kernel == "gr_binary_f32":
        shape = (1, c, out.rows, out.cols)
        strides = contiguous_strides(shape)
        return re.sub(r"static const int32_t sh\[4\] = \{[^}]*\}, sa\[4\] = \{[^}]*\}, sb\[4\] = \{[^}]*\};",
                      f"static const int32_t sh[4] = {c_ints(shape)}, sa[4] = {c_ints(strides)}, "
                      f"sb[4] = {c_ints(strides)};", code)
    n = math.prod(full)
    hits = re.findall(rf"(?<![\w.]){n}(?![\w.])", code)
    if len(hits) != 1:
        raise ValueError(f"cannot find the element count of {layer.step.kernel}")
    return re.sub(rf"(?<![\w.]){n}(?![\w.])", str(c * out.rows * out.cols), code)


def _elementwise_ok(layer: Layer, geo: dict[int, tuple[int, int, int]]) -> bool:
    """An element-wise step runs per patch when its operands are dense tensors of its shape."""
    if layer.step.kernel == "gr_binary_f32":
        full = (1, *geo[id(layer.out)])
        dense = c_ints(contiguous_strides(full))
        return f"sh[4] = {c_ints(full)}, sa[4] = {dense}, sb[4] = {dense};" in layer.step.code
    n = math.prod(geo[id(layer.out)])
    return len(re.findall(rf"(?<![\w.]){n}(?![\w.])", layer.step.code)) == 1


def plan(prog: Program, *, max_overhead: float = DEFAULT_MAX_OVERHEAD,
         grid: tuple[int, int] | None = None) -> tuple[Patched | None, dict[str, Any]]:
    """The patched program with the lowest arena within ``max_overhead`` (``grid``: only
    that grid), and a report: the choice, the unpatched arena and every candidate tried."""
    from ....rewrite.memory_plan import peak_live_bytes
    from .codegen import arena_buffers, plan_arena   # codegen does not import this module: no cycle

    base = plan_arena(prog).plan.arena_bytes
    total_macs = sum(s.macs for s in prog.steps)
    report: dict[str, Any] = {"arena_unpatched_bytes": base, "max_overhead": max_overhead, "applied": False}
    stage = find_stage(prog)
    if stage is None:
        report["reason"] = "the program does not start with convolutions over its one NCHW input"
        return None, report
    for i, layer in enumerate(stage.layers):
        if layer.kind == "elementwise" and not _elementwise_ok(layer, stage.geo):
            stage.layers = stage.layers[:i]
            break
    splits = stage.splits(prog) if stage.layers else []
    if len(stage.layers) < len(prog.steps):  # the first step that cannot run per patch, and its kernel
        nxt = prog.steps[len(stage.layers)]
        report["stage_ends_at"] = f"{nxt.op}{' @ ' + nxt.path if nxt.path else ''} ({nxt.kernel})"
    if not splits:
        report["reason"] = "no split point: the first layers' tensors are read after every candidate split"
        return None, report
    # every split and grid within the overhead (MACs are cheap to count), least recompute
    # first; a candidate is planned only when its live-bytes lower bound can beat the best
    tried = []
    for k in splits:
        _, th, tw = stage.geo[id(stage.layers[k - 1].out)]
        grids = [grid] if grid else [(r, c) for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)
                                     if r * c > 1]
        stage_macs = None
        for g in grids:
            if g[0] > th or g[1] > tw:
                continue
            if stage_macs is None:
                stage_macs = patched_macs(stage, k, (1, 1))
            overhead = (patched_macs(stage, k, g) - stage_macs) / max(1, total_macs)
            tried.append((overhead, -g[0] * g[1], k, g))
    # a split's floor: the live bytes of the steps after it, which patches do not change
    buffers = arena_buffers(prog)
    floor = {k: peak_live_bytes([dataclasses.replace(b, start=max(b.start, k)) for b in buffers if b.end >= k])
             for k in splits}
    candidates, best = [], None
    for overhead, _, k, g in sorted(tried):
        row = {"split_step": k, "grid": list(g), "arena_bytes": None, "macs_overhead": round(overhead, 4)}
        candidates.append(row)
        if overhead > max_overhead + 1e-12:
            row["skipped"] = "over the recompute limit"
            continue
        if best is not None and floor[k] >= best[0][0]:
            row["skipped"] = "the steps after its split need no less than the best arena"
            continue
        p = patch(prog, stage, k, g)
        row["arena_bytes"] = arena = plan_arena(p.program).plan.arena_bytes
        if best is None or (arena, overhead) < best[0]:
            best = ((arena, overhead), p, overhead)
    report["candidates"] = candidates
    if best is None:
        report["reason"] = f"every candidate recomputes more than {max_overhead:.0%} of the model's MACs"
        return None, report
    (arena, overhead), p, _ = best
    t = stage.layers[p.k - 1]
    report.update({"split_step": p.k, "split_tensor": t.out.name, "split_path": t.step.path,
                   "split_op": t.step.op, "split_shape": list(stage.geo[id(t.out)]),
                   "grid": list(p.grid), "patches": p.grid[0] * p.grid[1], "arena_bytes": arena,
                   "stage_macs": p.stage_macs, "stage_macs_patched": p.macs,
                   "macs_overhead": round(overhead, 4), "model_macs": total_macs})
    return p, report


def parse_grid(mode: str) -> tuple[int, int] | None:
    """The grid a ``patches`` mode asks for (``N`` / ``RxC``); None for ``auto`` / ``on``."""
    if mode in ("auto", "on"):
        return None
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", mode)
    if not m:
        raise ValueError(f"patches={mode!r}: use auto, on, off, N or RxC (e.g. 4x4)")
    return int(m.group(1)), int(m.group(2) or m.group(1))


def apply(prog: Program, mode: str = "auto", max_overhead: float = DEFAULT_MAX_OVERHEAD) -> tuple[Program, dict]:
    """``mode``: ``off`` (unchanged), ``auto`` (patched when its arena plus the whole input
    is below the unpatched arena, which holds the input: on when it lowers the peak even
    for an application that keeps the whole input in SRAM), ``on`` (the best candidate),
    or ``RxC`` / ``N`` (that grid)."""
    if mode == "off":
        return prog, {"applied": False, "mode": "off"}
    grid = parse_grid(mode)
    best, report = plan(prog, max_overhead=max_overhead, grid=grid)
    report["mode"] = mode
    if best is None:
        return prog, report
    in_bytes = sum(v.nbytes for v in prog.inputs)
    if mode == "auto" and report["arena_bytes"] + in_bytes >= report["arena_unpatched_bytes"]:
        report["reason"] = (f"patched arena {report['arena_bytes']} B + input {in_bytes} B is not below "
                            f"the unpatched arena {report['arena_unpatched_bytes']} B")
        return prog, report
    report["applied"] = True
    best.program.notes["patches"] = report
    return best.program, report
