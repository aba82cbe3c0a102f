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

    python benchmarks/mcu_train_memory.py [--publish]
    (writes results/mcu_train_memory.json; --publish also rebuilds BENCHMARKS.md)
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
from benchmarks.mcu_train_budget import FLASH_KB, QAS, RAM_KB, SCHEMES, TTE, build_step  # noqa: E402

REWRITES = ("int8_reduce", "bcast_grads", "inplace_dw_bwd", "fused_update", "ir_bwd", "chunked_pool")
VARIANTS = {  # name -> (backward rewrites on, patches option)
    "before": (False, "off"),
    "rewrites, no patches": (True, "off"),
    "after": (True, "auto"),
}
TARGET_KB = 100


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
    mcu, plan = art.report["mcu"], art.report["memory_plan"]
    dev, rt = plan.get("device", {}), mcu.get("runtime", {})
    layers = (rt.get("instructions_per_layer") or {})
    by_kernel: dict[str, int] = {}
    for layer in layers.get("layers", []):
        key = layer["kernel"] + (" (fused update)" if "fused update" in layer["op"] else "")
        by_kernel[key] = by_kernel.get(key, 0) + layer["instructions"]
    matched = bool(layers.get("matched_all"))
    stage = sum(l["instructions"] for l in layers.get("layers", []) if "[patch " in l["op"]) if matched else None
    return {"variant": name, "patches_option": patches, "rewrites": on, "compile_seconds": round(time.time() - t0, 1),
            "arena_bytes": mcu["arena_bytes"], "trained_bytes": mcu["trained_bytes"],
            "planned_sram_bytes": plan["sram_bytes"], "elf_model_sram_bytes": dev.get("model_sram_bytes"),
            "model_sram_as_planned": dev.get("model_sram_as_planned"),
            "sram_measured_bytes": dev.get("sram_measured_bytes"), "stack_peak_bytes": dev.get("stack_peak_bytes"),
            "input_in_arena": plan.get("input_in_arena"), "input_bytes": plan.get("input_bytes"),
            "instructions_per_step": rt.get("instructions_per_step"),
            "instructions_patched_stage": stage,
            "instructions_input_reads": by_kernel.get("gr_patch_read") if matched else None,
            "instructions_by_kernel": dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]) if matched else None,
            "bit_exact": (mcu.get("int8_check") or {}).get("bit_exact"),
            "verification": {k: art.report["verification"].get(k) for k in ("checked", "loss_relative_error", "units")},
            "patches": {k: v for k, v in mcu.get("patches", {}).items() if k != "candidates"},
            "breakdown": planned}


def _with_qas(g):
    from gradrewrite.compiler import run_pipeline

    q = g.clone()
    run_pipeline(q, QAS, verify=False)
    return q


def main(publish: bool) -> None:
    warnings.filterwarnings("ignore")
    t0 = time.time()
    step = build_step(128)[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
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
        "rows": rows}
    print(_report.md_table(section["columns"], rows))
    data = {"title": "On-device training memory: the int8 step's rewrites", "variants": results,
            "seconds": round(time.time() - t0, 1), "sections": [section]}
    if publish:
        _report.publish("mcu_train_memory", data)
    else:
        print("wrote", _report.write("mcu_train_memory", data))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--publish", action="store_true", help="also rebuild BENCHMARKS.md")
    main(ap.parse_args().publish)
