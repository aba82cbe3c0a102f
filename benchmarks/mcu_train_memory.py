"""Memory of the on-device int8 training step, before and after the step's memory rewrites
(issue 19, item 4): MobileNetV2-w0.35 @ 128x128, the TTE-like sparse-update scheme of
``mcu_train_budget.py``, Cortex-M7, 256 KB SRAM / 1 MB flash.

Each variant is one ``compile_graph`` of the same int8 step (``--backend mcu --target
cortex-m7``: host build checked bit for bit against the integer reference, train.elf
linked, one step measured under QEMU):

- ``before``: every rewrite off (``TrainLowerer`` flags ``int8_reduce``, ``bcast_grads``,
  ``inplace_dw_bwd``, ``fused_update``, ``ir_bwd``, ``chunked_pool`` False; backend option
  ``patches=off``);
- ``rewrites, no patches``: the lowering's rewrites on, the first stage whole (the input
  in the arena);
- ``after``: the backend's defaults (all on; ``patches=auto``: the first stage per patch,
  its input read window by window from the batch file, not held in SRAM).

Per variant: the planned arena and what is live at its peak step, the trained parameters
by kind, the model's SRAM planned and in train.elf, the SRAM measured under QEMU (linked
SRAM less the unused stack and heap reserves) and the instructions per step.

A second table (issue 19's memory table, ``--table tte``) sets the steps beside TTE's
full / sparse / sparse + reordering figures (On-Device Training Under 256KB Memory, Lin et
al., NeurIPS 2022: 2939 / 335 / 141 KB, MobileNetV2-w0.35 @ 128, int8), fp32 and int8,
each cell one compile linked against the emulated board's 4 MB SRAM / 4 MB flash and one
step measured under QEMU: full update (no sparse-update: every weight and bias trained;
rewrites off, ``patches=off``), the TTE-like scheme with the rewrites off and
``patches=off``, with the lowering's rewrites on, and the defaults (``patches=auto``).
fp32 steps: fold-bn, the fp32 step, sparse-update (no quantize, no qas).

    python benchmarks/mcu_train_memory.py [--table rewrites|tte|all] [--publish]
    (writes results/mcu_train_memory.json; --publish also rebuilds BENCHMARKS.md; a table
    not rerun keeps what the JSON had)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _report  # noqa: E402
from benchmarks.training_memory import TTE_KB  # noqa: E402
from benchmarks.mcu_train_budget import FLASH_KB, QAS, RAM_KB, SCHEMES, TTE, build_step  # noqa: E402

REWRITES = ("int8_reduce", "bcast_grads", "inplace_dw_bwd", "fused_update", "ir_bwd", "chunked_pool")
VARIANTS = {  # name -> (backward rewrites on, patches option)
    "before": (False, "off"),
    "rewrites, no patches": (True, "off"),
    "after": (True, "auto"),
}
TARGET_KB = 100
# issue 19's memory table: TTE's peak memory (paper, Lin et al. 2022, MobileNetV2-w0.35 @ 128, int8)
TTE_TABLE_KB = {"full update": TTE_KB["full update"], "sparse": TTE_KB["sparse update"],
                "sparse + reorder": TTE_KB["sparse + reordering"]}
BOARD_RAM_KB, BOARD_FLASH_KB = 4096, 4096    # the emulated board: every row links if it fits the board
QEMU_STEP_TIMEOUT_S = 480                    # one measured step; longer is reported, not waited for
TTE_ROWS = {  # row -> (sparse-update scheme or None (full update), rewrites on, patches option, TTE KB)
    "full update": (None, False, "off", TTE_TABLE_KB["full update"]),
    "sparse (rewrites off, no patches)": (SCHEMES["tte-like"], False, "off", TTE_TABLE_KB["sparse"]),
    "sparse + reorder (rewrites on, no patches)": (SCHEMES["tte-like"], True, "off", TTE_TABLE_KB["sparse + reorder"]),
    "+ patch-based (defaults)": (SCHEMES["tte-like"], True, "auto", None),
}


@contextlib.contextmanager
def rewrites(on: bool):
    from gradrewrite.backends.mcu.training.lowering.lowerer import TrainLowerer

    old = {f: getattr(TrainLowerer, f) for f in REWRITES}
    for f in REWRITES:
        setattr(TrainLowerer, f, on)
    try:
        yield
    finally:
        for f, v in old.items():
            setattr(TrainLowerer, f, v)


def breakdown(graph, patches: str) -> dict:
    """The arena's peak step (live bytes, in-place pairs counted once) and its largest
    live buffers, and the trained parameters by kind, from the lowering the compile uses."""
    from gradrewrite.backends.mcu.inference.codegen import arena_buffers
    from gradrewrite.backends.mcu.training.memory import plan_step_arena
    from gradrewrite.backends.mcu.training.patches import lower_step

    tp = lower_step(graph.clone(), patches)
    plan = plan_step_arena(tp)
    prog = tp.program
    bufs = arena_buffers(prog, inputs=[prog.inputs[0].buf])
    by_name = {b.name: b for b in bufs}
    best = None
    for s in range(len(prog.steps) + 1):
        live = [b for b in bufs if b.lives_at(s)]
        total, used = sum(b.size for b in live), set()
        for b in sorted(live, key=lambda b: b.name):
            prev = by_name.get(b.inplace_of) if b.inplace_of else None
            if prev is not None and b.start == s and prev.end == s and prev.name not in used:
                used.add(prev.name)
                total -= min(b.size, prev.size)
        if best is None or total > best[0]:
            best = (total, s, live)
    total, s, live = best
    step = prog.steps[s] if s < len(prog.steps) else None
    kinds: dict[str, int] = {}
    for b in tp.trained:
        key = {"i8": "int8 weights", "i32": "int32 biases"}.get(b.dtype, f"{b.dtype} arrays")
        kinds[key] = kinds.get(key, 0) + b.nbytes
    masks = sum(b.size for b in live if b.name.startswith("mask_bits"))
    return {"arena_bytes": plan.plan.arena_bytes, "peak_live_bytes": total,
            "peak_step": f"{s}: {step.op} @ {step.path} ({step.kernel})" if step else "end",
            "peak_live": [[b.name, b.size] for b in sorted(live, key=lambda b: -b.size)[:5]],
            "peak_mask_bits_bytes": masks, "trained_by_kind": kinds,
            "trained_largest": sorted(([b.path, b.dtype, b.nbytes] for b in tp.trained), key=lambda r: -r[2])[:4]}


def compile_variant(step, name: str, out: Path) -> dict:
    from gradrewrite.compiler import CompileOptions, compile_graph, run_pipeline

    on, patches = VARIANTS[name]
    g = step.clone()
    run_pipeline(g, SCHEMES["tte-like"], verify=False)
    with rewrites(on):
        planned = breakdown(_with_qas(g), patches)
        opts = CompileOptions(passes=QAS, backend="mcu", verify_inputs=1, latency_runs=0,
                              backend_options={"target": "cortex-m7", "ram_kb": RAM_KB, "flash_kb": FLASH_KB,
                                               "measure": True, "patches": patches})
        t0 = time.time()
        art = compile_graph(g, out, opts)
    mcu, rt = art.report["mcu"], art.report["mcu"].get("runtime", {})
    layers = (rt.get("instructions_per_layer") or {})
    by_kernel: dict[str, int] = {}
    for layer in layers.get("layers", []):
        key = layer["kernel"] + (" (fused update)" if "fused update" in layer["op"] else "")
        by_kernel[key] = by_kernel.get(key, 0) + layer["instructions"]
    matched = bool(layers.get("matched_all"))
    stage = sum(l["instructions"] for l in layers.get("layers", []) if "[patch " in l["op"]) if matched else None
    m = _measured(art, int8=True)
    return {"variant": name, "patches_option": patches, "rewrites": on, "compile_seconds": round(time.time() - t0, 1),
            **{k: m[k] for k in ("arena_bytes", "trained_bytes", "planned_sram_bytes", "elf_model_sram_bytes")},
            "model_sram_as_planned": art.report["memory_plan"].get("device", {}).get("model_sram_as_planned"),
            **{k: m[k] for k in ("sram_measured_bytes", "stack_peak_bytes", "input_in_arena", "input_bytes",
                                 "instructions_per_step")},
            "instructions_patched_stage": stage,
            "instructions_input_reads": by_kernel.get("gr_patch_read") if matched else None,
            "instructions_by_kernel": dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]) if matched else None,
            "bit_exact": m["bit_exact"], "verification": m["verification"],
            "patches": {k: v for k, v in mcu.get("patches", {}).items() if k != "candidates"},
            "breakdown": planned}


def _with_qas(g):
    from gradrewrite.compiler import run_pipeline

    q = g.clone()
    run_pipeline(q, QAS, verify=False)
    return q


def build_fp32_step(res: int):
    """The fp32 step (fold-bn, cross-entropy, SGD at the int8 step's lr) of MobileNetV2-w0.35."""
    import torch

    from benchmarks.mcu_train_budget import LR
    from examples.models import mobilenet_v2
    from gradrewrite.compiler import run_pipeline
    from gradrewrite.rewrite.capture import capture
    from gradrewrite.rewrite.train_step import capture_train_step

    model, (x,) = mobilenet_v2(0.35, res, num_classes=10)
    g = capture(model, (x,))
    run_pipeline(g, "fold-bn", verify=False)
    return capture_train_step(g, "cross_entropy", (x, torch.tensor([3])), lr=LR)


def compile_tte_row(step, row: str, int8: bool, out: Path) -> dict:
    """One cell of the TTE table: ``step`` with the row's scheme (none: full update), qas
    for int8, the row's rewrites and patches, linked for the 4 MB board and one step
    measured under QEMU. A compile that fails (does not fit the board, QEMU over
    QEMU_STEP_TIMEOUT_S, ...) is recorded with its message."""
    from gradrewrite.backends.mcu.firmware import qemu
    from gradrewrite.compiler import CompileOptions, compile_graph, run_pipeline

    scheme, on, patches, _ = TTE_ROWS[row]
    g = step.clone()
    if scheme:
        run_pipeline(g, scheme, verify=False)
    opts = CompileOptions(passes=QAS if int8 else None, backend="mcu", verify_inputs=1, latency_runs=0,
                          backend_options={"target": "cortex-m7", "ram_kb": BOARD_RAM_KB, "flash_kb": BOARD_FLASH_KB,
                                           "measure": True, "patches": patches})
    base = {"row": row, "dtype": "int8" if int8 else "fp32", "scheme": scheme or "(full update)",
            "passes": QAS if int8 else "", "rewrites": on, "patches_option": patches}
    old_timeout, t0 = qemu.COUNT_TIMEOUT_S, time.time()
    qemu.COUNT_TIMEOUT_S = QEMU_STEP_TIMEOUT_S
    try:
        with rewrites(on):
            art = compile_graph(g, out, opts)
    except Exception as exc:  # noqa: BLE001  (the row says why instead of a number)
        return {**base, "ok": False, "compile_seconds": round(time.time() - t0, 1),
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
    finally:
        qemu.COUNT_TIMEOUT_S = old_timeout
    mcu, m = art.report["mcu"], _measured(art, int8)
    fw = mcu.get("firmware", {})
    return {**base, "ok": True, "compile_seconds": round(time.time() - t0, 1),
            **{k: m[k] for k in ("arena_bytes", "trained_bytes", "planned_sram_bytes", "elf_model_sram_bytes")},
            "sram_linked_bytes": fw.get("sram_bytes"), "flash_bytes": fw.get("flash_bytes"),
            **{k: m[k] for k in ("sram_measured_bytes", "stack_peak_bytes", "input_in_arena", "input_bytes",
                                 "instructions_per_step")},
            "patches_applied": bool(mcu.get("patches", {}).get("applied")),
            "bit_exact": m["bit_exact"], "verification": m["verification"]}


def _measured(art, int8: bool) -> dict:
    """What one compile of the step measured (report.json: mcu, memory_plan, verification)."""
    mcu, plan = art.report["mcu"], art.report["memory_plan"]
    dev = plan.get("device", {})
    return {"arena_bytes": mcu["arena_bytes"], "trained_bytes": mcu["trained_bytes"],
            "planned_sram_bytes": plan["sram_bytes"], "elf_model_sram_bytes": dev.get("model_sram_bytes"),
            "sram_measured_bytes": dev.get("sram_measured_bytes"), "stack_peak_bytes": dev.get("stack_peak_bytes"),
            "input_in_arena": plan.get("input_in_arena"), "input_bytes": plan.get("input_bytes"),
            "instructions_per_step": mcu.get("runtime", {}).get("instructions_per_step"),
            "bit_exact": (mcu.get("int8_check") or {}).get("bit_exact") if int8 else None,
            "verification": {k: art.report["verification"].get(k) for k in ("checked", "loss_relative_error", "units")}}


def _why(error: str) -> str:
    """A table cell for a row that was not measured: the link failure's figures, or the error."""
    import re

    over = re.search(r"exceeds (SRAM|flash) by ([\d.]+ KB)", error)
    if "does not fit" in error and over:
        arena = re.search(r"arena alone is ([\d.]+ KB)", error)
        return (f"does not link on the {BOARD_RAM_KB // 1024} MB board: {over[1]} over by {over[2]}"
                + (f" (planned arena {arena[1]})" if arena else ""))
    return "not measured: " + error[:160]


def tte_table(tmp: Path) -> tuple[dict, dict]:
    """Issue 19's memory table: every row of TTE_ROWS in fp32 and int8, beside TTE's figures."""
    from benchmarks.mcu_train_budget import build_step

    results: dict[str, dict] = {}
    steps = {"fp32": build_fp32_step(128), "int8": build_step(128)[0]}
    for dtype, step in steps.items():
        for row in TTE_ROWS:
            name = f"{row} [{dtype}]"
            r = compile_tte_row(step, row, dtype == "int8", tmp / f"tte_{dtype}_{len(results)}")
            results[name] = r
            print("tte", name, json.dumps(r, default=str), flush=True)
    kb = lambda v: round(v / 1024, 1) if isinstance(v, (int, float)) else "-"  # noqa: E731

    def cells(r: dict) -> list:
        if not r["ok"]:
            return [_why(r["error"]), "-", "-"]
        mi = round(r["instructions_per_step"] / 1e6, 1) if r.get("instructions_per_step") else "-"
        return [kb(r["sram_measured_bytes"]), kb(r["arena_bytes"]), mi]

    rows = [[row, *cells(results[f"{row} [fp32]"]), *cells(results[f"{row} [int8]"]),
             tte if tte is not None else "-"] for row, (_, _, _, tte) in TTE_ROWS.items()]
    section = {
        "heading": "Issue 19's memory table: full / sparse / sparse + reorder / + patch-based, fp32 and int8, "
                   "beside TTE",
        "text": "MobileNetV2-w0.35 @ 128x128, batch 1, 10 classes, Cortex-M7. Each cell is one `compile_graph` "
                f"(`--backend mcu --target cortex-m7 --ram-kb {BOARD_RAM_KB} --flash-kb {BOARD_FLASH_KB}`: linked "
                "against the emulated board's 4 MB, so a step too big for a 256 KB part is still measured), one step "
                "run under QEMU. int8: fold-bn, quantize static, the step, [sparse-update], "
                f"`{QAS}`; fp32: fold-bn, the step, [sparse-update] (no quantize, no qas). Full update: no "
                "sparse-update (every weight and bias trained), the rewrites off, `patches=off`. Sparse: the "
                f"TTE-like scheme `{SCHEMES['tte-like']}` with every `TrainLowerer` memory rewrite "
                f"({', '.join(REWRITES)}) off and `patches=off`; + reorder: those rewrites on (in-place depthwise "
                "backward, weight gradients made row by row in the update, per-channel inverted-residual and pool "
                "backward), `patches=off`; + patch-based: the defaults (`patches=auto`: the first stage per patch, "
                "the input read window by window, not held in SRAM). Measured SRAM = linked SRAM less the unused "
                "stack and heap reserves. M instructions: executed instructions of one step under QEMU (a proxy "
                "for time, not cycles). The rewrites are int8 lowerings: the fp32 step lowers the same with them "
                "on or off. TTE KB: the paper's peak memory (Lin et al., On-Device Training Under 256KB Memory, "
                f"NeurIPS 2022: full update {TTE_KB['full update']}, sparse update {TTE_KB['sparse update']}, "
                f"sparse + operator reordering {TTE_KB['sparse + reordering']} KB; int8, "
                "their own scheme, their memory model), not reproduced here. A cell that could not be measured "
                f"says why (a step over {QEMU_STEP_TIMEOUT_S} s under QEMU is not waited for).",
        "columns": ["row", "fp32 SRAM measured KB", "fp32 arena KB", "fp32 M instructions / step",
                    "int8 SRAM measured KB", "int8 arena KB", "int8 M instructions / step", "TTE KB (paper)"],
        "rows": rows, "part": "tte"}
    print(_report.md_table(section["columns"], rows), flush=True)
    return results, section


def main(publish: bool, tables: set[str]) -> None:
    warnings.filterwarnings("ignore")
    t0 = time.time()
    previous = _report.RESULTS / "mcu_train_memory.json"  # a table not rerun keeps what the JSON had
    old = json.loads(previous.read_text()) if previous.exists() else {}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tte = tte_table(Path(tmp)) if "tte" in tables else None
        if "rewrites" not in tables:
            _finish(old, tte, t0, publish)
            return
        step = build_step(128)[0]
        for name in VARIANTS:
            r = compile_variant(step, name, Path(tmp) / name.replace(" ", "_").replace(",", ""))
            results[name] = r
            print(name, json.dumps(r, default=str), flush=True)
    kb = lambda v: round(v / 1024, 1) if isinstance(v, (int, float)) else "-"  # noqa: E731
    rows = [[n, kb(r["arena_bytes"]), kb(r["trained_bytes"]), kb(r["planned_sram_bytes"]),
             kb(r["sram_measured_bytes"]),
             kb(r["sram_measured_bytes"] + (0 if r["input_in_arena"] else r["input_bytes"])),
             round(r["instructions_per_step"] / 1e6, 1) if r.get("instructions_per_step") else "-",
             r["breakdown"]["peak_step"], "yes" if r["bit_exact"] else "NO",
             "yes" if (r["sram_measured_bytes"] or 1e9) <= TARGET_KB * 1024 else "no"] for n, r in results.items()]
    rows.append(["TTE (paper, STM32F746)", "", "", "", TTE["sram_kb"], "", f"{TTE['latency_ms']} ms", "", "", ""])
    section = {
        "heading": "Memory of the int8 training step: MobileNetV2-w0.35 @ 128x128, TTE-like scheme, Cortex-M7",
        "text": "One `compile_graph` per row of the same int8 step (fold-bn, quantize static, the TTE-like "
                f"sparse-update scheme `{SCHEMES['tte-like']}`, `{QAS}`; `--backend mcu --target cortex-m7 "
                f"--ram-kb {RAM_KB}`), host build checked bit for bit against the integer reference, one step "
                "measured under QEMU. before: the step's memory rewrites off (no int8 mean, the pooled gradient "
                "stored whole, depthwise input gradients in a second buffer, whole weight gradients stored, the "
                "inverted residual blocks' expanded gradients stored, the last conv's output stored whole before "
                "the pool, the first stage whole); rewrites: those on; "
                "after: the defaults (patches=auto too). "
                "Planned SRAM = arena + trained parameters + labels; measured = linked SRAM less the unused stack "
                "and heap reserves (harness, C library heap and stack on top of the model's); with patches the input "
                "is read window by window from the batch file during the step (as from a camera) and is not in SRAM: "
                "'+ input' adds the whole int8 input, for an application that keeps the frame. Peak step: where the "
                f"arena's live bytes peak. Target: <= {TARGET_KB} KB measured.",
        "columns": ["variant", "arena KB", "trained params KB", "planned SRAM KB", "SRAM measured KB",
                    "+ input KB", "M instructions / step", "arena peak at", "bit-exact", f"<= {TARGET_KB} KB"],
        "rows": rows, "part": "rewrites"}
    print(_report.md_table(section["columns"], rows))
    _finish({"variants": results, "sections": [section]} if "tte" in tables else {**old, "variants": results,
            "sections": [section] + [sec for sec in old.get("sections", []) if sec.get("part") == "tte"]},
            tte, t0, publish)


def _finish(data: dict, tte, t0: float, publish: bool) -> None:
    """Write (or publish) the JSON: the rewrites table's data as given, the TTE table's new
    results when run (else what ``data`` had)."""
    data = {**data, "title": "On-device training memory: the int8 step's rewrites, and beside TTE",
            "seconds": round(time.time() - t0, 1)}
    if tte is not None:
        data["tte_table"] = tte[0]
        data["sections"] = [sec for sec in data.get("sections", []) if sec.get("part") != "tte"] + [tte[1]]
    if publish:
        _report.publish("mcu_train_memory", data)
    else:
        print("wrote", _report.write("mcu_train_memory", data))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--publish", action="store_true", help="also rebuild BENCHMARKS.md")
    ap.add_argument("--table", choices=("rewrites", "tte", "all"), default="all",
                    help="rewrites: the int8 step before/after its rewrites; tte: full / sparse / + reorder / "
                         "+ patches in fp32 and int8 beside TTE; all (default): both")
    args = ap.parse_args()
    main(args.publish, {"rewrites", "tte"} if args.table == "all" else {args.table})
