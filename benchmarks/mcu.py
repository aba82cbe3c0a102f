"""MCU backend: flash, SRAM and instructions per inference of generated C on a Cortex-M4.

For every model and variant: ``gr.compile(..., backend="mcu", target="host")`` (lowering,
arena plan, host build verified against the model), then the same C project is linked
for a Cortex-M4 (``firmware.build_firmware``, with the whole emulated board as the
budget so that over-budget configurations are still measured; "fits" says whether it
fits the default STM32F746-like budget of 320 KB SRAM / 1 MB flash) and run once under
qemu-system-arm (mps2-an386) on a seeded input:

- flash: .text + .rodata + .data image of the linked firmware (code, weights, libc);
- SRAM planned: the activation arena (greedy-by-size plan), against a naive plan (every
  tensor its own buffer) and the lower bound of a sequential schedule (max over steps of
  the live bytes, at least the two largest tensors live together);
- SRAM measured: .data + .bss (arena and the harness's input/output buffers) + the stack
  high-water mark found by stack painting + the heap the harness's stdio took;
- instructions per inference: executed instructions of model_run counted from QEMU's
  translation-block log. These are instruction counts, not cycles (QEMU models no
  pipeline, no wait states, no caches); counting streams a ~1 GB log per 100M
  instructions through Python, so ``--quick`` counts only the small CNN.

Variants: fp32 (fold-bn), int8 (static W8A8 quantization, 16 random calibration
samples), int8 + N:M (``nm-sparsity`` one-shot magnitude masks, then int8). Rows that
the code generator cannot build yet are listed with the reason.

    python benchmarks/mcu.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradrewrite as gr  # noqa: E402
from benchmarks import _report  # noqa: E402
from examples.models import mobilenet_v2, small_cnn, tiny_gpt  # noqa: E402
from gradrewrite.backends.mcu.firmware import build as firmware, qemu  # noqa: E402
from gradrewrite.backends.mcu.inference import reference  # noqa: E402
from gradrewrite.backends.mcu.packing import pack_inputs  # noqa: E402
from gradrewrite.errors import GradrewriteError  # noqa: E402
from gradrewrite.backends.mcu.targets import BOARD_FLASH_KB, BOARD_RAM_KB, DEFAULT_FLASH_KB, DEFAULT_RAM_KB  # noqa: E402

TARGET = "cortex-m4"
NP = {"float32": np.float32, "int8": np.int8, "int32": np.int32, "int64": np.int64, "uint8": np.uint8}


def models(quick: bool) -> dict[str, Any]:
    out = {"small CNN 32x32": lambda: small_cnn(),
           "MobileNetV2-w0.35 96x96": lambda: mobilenet_v2(0.35, 96, num_classes=10),
           "MobileNetV2-w0.35 128x128": lambda: mobilenet_v2(0.35, 128, num_classes=10),
           "tiny transformer (GPT, 2 layers, d=128, T=64)": lambda: tiny_gpt()}
    if quick:
        out.pop("MobileNetV2-w0.35 128x128")
    return out


VARIANTS = {
    "fp32": "fold-bn",
    "int8": "fold-bn,quantize(mode=static)",
    "int8, no patches": "fold-bn,quantize(mode=static)",
    "int8, not streamed": "fold-bn,quantize(mode=static)",
    "int8 + 2:4": "fold-bn,nm-sparsity(n=2,m=4),quantize(mode=static)",
    "int8 + 1:8": "fold-bn,nm-sparsity(n=1,m=8),quantize(mode=static)",
}
# backend options per variant: "not streamed" turns off the in-place depthwise convs and the
# streamed expand + depthwise pairs, to measure what they save side by side in one run;
# "no patches" turns off patch-based execution of the first stage (on by default where it
# lowers the peak), measured on the MobileNetV2 models only
# the N:M rows run without patches too: they are compared with "int8, no patches", so that the
# ratio is the kernels' alone
VARIANT_OPTIONS = {"int8, not streamed": {"stream": False}, "int8, no patches": {"patches": "off"},
                   "int8 + 2:4": {"patches": "off"}, "int8 + 1:8": {"patches": "off"}}
VARIANT_MODELS = {"int8, no patches": "MobileNetV2"}
PATCH_TARGET = ("MobileNetV2-w0.35 128x128", 56 * 1024)   # int8 with patches: measured SRAM <= 56 KB
# issue 18's instruction targets on MobileNetV2-w0.35 96x96, judged without patches (their
# recompute is the patch section's): dense int8 total, and N:M over dense int8
INT8_TARGET = ("MobileNetV2-w0.35 96x96", 36e6)
NM_TARGETS = {"int8 + 1:8": 2.5, "int8 + 2:4": 1.4}


def calibration(example: tuple, n: int = 16) -> list[tuple]:
    gen = torch.Generator().manual_seed(7)
    samples = []
    for _ in range(n):
        sample = []
        for x in example:
            if x.dtype.is_floating_point:
                sample.append(torch.randn(x.shape, generator=gen))
            else:  # token ids: the same range as the example's
                sample.append(torch.randint(0, int(x.max()) + 1, x.shape, generator=gen, dtype=x.dtype))
        samples.append(tuple(sample))
    return samples


def unpack(raw: bytes, specs) -> list[np.ndarray]:
    out, off = [], 0
    for s in specs:
        n = int(np.prod(s["shape"], dtype=np.int64))
        out.append(np.frombuffer(raw, dtype=NP[s["dtype"]], count=n, offset=off).reshape(s["shape"]))
        off += s["bytes"]
    return out


def measure(name: str, factory, variant: str, pipeline: str, count: bool, work: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "variant": variant, "pipeline": pipeline}
    model, example = factory()
    graph = gr.capture(model, example)
    out = work / f"{len(list(work.iterdir()))}"
    t0 = time.perf_counter()
    try:
        gr.compile(graph, out, passes=pipeline, backend="mcu",
                   backend_options={"target": "host", **VARIANT_OPTIONS.get(variant, {})},
                         calibration=calibration(example) if "quantize" in pipeline else None,
                         verify_inputs=1, latency_runs=0)
        project = out / "mcu"
        fw = firmware.build_firmware(project, TARGET, ram_kb=BOARD_RAM_KB, flash_kb=BOARD_FLASH_KB)
    except Exception as exc:  # a missing row says why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        row["missing"] = first[:300]
        return row
    row["build_s"] = round(time.perf_counter() - t0, 1)
    facts = json.loads((project / "model.json").read_text())   # the code generator's facts
    data = pack_inputs([x.numpy() for x in example], facts["inputs"])  # int8 inputs: quantized here
    raw, stats = qemu.run_firmware(fw.elf, data, TARGET, count_instructions=count, per_symbol=count)
    host_raw = firmware.run_host(project / firmware.HOST_EXE, data)
    with torch.no_grad():
        ref = model(*example)
    ref = [ref.numpy()] if isinstance(ref, torch.Tensor) else [r.numpy() for r in ref]
    got = unpack(raw, facts["outputs"])
    rel = max(float(np.linalg.norm(g.astype(np.float64) - r) / max(np.linalg.norm(r), 1e-30))
              for g, r in zip(got, ref))
    try:  # the device against the artifact's own reference (int8: the integer reference)
        chk = reference.compare(project, [x.numpy() for x in example], got)
        row["device_vs_reference"] = ("bit-exact" if "bit-exact" in chk["mode"]
                                      else f"rel {chk['relative_error']:.1g}")
    except GradrewriteError as exc:
        row["device_vs_reference"] = f"MISMATCH: {exc.one_line()[:200]}"
    s = fw.sections
    static = s.get(".data", 0) + s.get(".bss", 0)
    macs = sum(op.get("macs", 0) for op in facts.get("ops", []))
    row.update({
        "macs": macs,
        "weights_bytes": facts.get("weights_bytes"),
        "flash_bytes": fw.flash_bytes,
        "arena_bytes": facts["arena_bytes"],
        "naive_bytes": facts["naive_bytes"],
        "lower_bound_bytes": facts["lower_bound_bytes"],
        "static_sram_bytes": static,
        "stack_model_bytes": stats["stack_model_bytes"],
        "stack_peak_bytes": stats["stack_peak_bytes"],
        "heap_used_bytes": stats["heap_used_bytes"],
        "sram_measured_bytes": static + stats["stack_peak_bytes"] + stats["heap_used_bytes"],
        "sram_reserved_bytes": fw.sram_bytes,
        "fits_default_budget": fw.sram_bytes <= DEFAULT_RAM_KB * 1024 and fw.flash_bytes <= DEFAULT_FLASH_KB * 1024,
        "device_equals_host_build": raw == host_raw,
        "rel_error_vs_fp32_model": rel,
        "int8_layers": facts.get("int8_layers"),
        "nm_layers": facts.get("nm_layers"),
        "input_bytes": sum(i["bytes"] for i in facts["inputs"]),
        "input_in_sram": facts.get("input_in_arena", True),
        "patches": {k: facts["patches"].get(k) for k in ("applied", "split_path", "split_shape", "grid",
                                                         "macs_overhead", "arena_unpatched_bytes", "reason")
                    if k in facts["patches"]} if facts.get("patches") else None,
    })
    if count:
        row["instructions"] = stats["instructions"]
        row["instructions_per_mac"] = stats["instructions"] / macs if macs else None
        row["instructions_top"] = dict(list(stats["instructions_per_symbol"].items())[:6])
        row["count_s"] = stats["qemu_seconds"]
        attributed = qemu.per_layer(facts.get("ops", []), stats["instructions_per_call"])
        row["instructions_per_layer"] = [[l["path"], l["op"], l["kernel"], l["instructions"]]
                                         for l in attributed["layers"]]
        row["instructions_per_layer_matched"] = attributed["matched_all"]
        if attributed["matched_all"]:  # patches: reading the input windows (the harness's file reads)
            row["input_read_instructions"] = sum(l["instructions"] for l in attributed["layers"]
                                                 if l["kernel"] == "gr_patch_read")
    return row


def _kb(n) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def sections(rows: list[dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    done = [r for r in rows if "missing" not in r]
    table = []
    for r in done:
        instr = r.get("instructions")
        table.append([r["model"], r["variant"], f"{r['macs'] / 1e6:.2f}", _kb(r["flash_bytes"]),
                      _kb(r["arena_bytes"]), _kb(r["naive_bytes"]), _kb(r["lower_bound_bytes"]),
                      _kb(r["sram_measured_bytes"]), r["stack_model_bytes"],
                      "yes" if r["fits_default_budget"] else "no",
                      "-" if instr is None else f"{instr / 1e6:.1f}",
                      "-" if instr is None else f"{r['instructions_per_mac']:.2f}",
                      r["device_vs_reference"], f"{r['rel_error_vs_fp32_model']:.2g}"])
    ratios = []
    by = {(r["model"], r["variant"]): r for r in done}
    for model in dict.fromkeys(r["model"] for r in done):
        fp, i8 = by.get((model, "fp32")), by.get((model, "int8"))
        flat = by.get((model, "int8, not streamed"))
        if i8 and flat:
            ratios.append([model, "int8 vs int8, not streamed", f"{flat['flash_bytes'] / i8['flash_bytes']:.2f}x",
                           f"{flat['sram_measured_bytes'] / i8['sram_measured_bytes']:.2f}x",
                           (f"{flat['instructions'] / i8['instructions']:.2f}x"
                            if i8.get("instructions") and flat.get("instructions") else "-")])
        for v in ("int8", "int8 + 2:4", "int8 + 1:8"):
            r = by.get((model, v))
            if not (r and fp):
                continue
            base = (by.get((model, "int8, no patches")) or i8) if v != "int8" and i8 else fp
            ratios.append([model, f"{v} vs {base['variant']}",
                           f"{base['flash_bytes'] / r['flash_bytes']:.2f}x",
                           f"{base['sram_measured_bytes'] / r['sram_measured_bytes']:.2f}x",
                           (f"{base['instructions'] / r['instructions']:.2f}x"
                            if r.get("instructions") and base.get("instructions") else "-")])
    patch_rows = _patch_rows(done, by)
    missing = [[r["model"], r["variant"], r["missing"]] for r in rows if "missing" in r]
    layers = []
    for r in done:
        if r["model"].startswith("small CNN") and r.get("instructions_per_layer_matched"):
            top = sorted(r["instructions_per_layer"], key=lambda l: -l[3])[:4]
            layers += [[r["variant"], path, op, kernel, f"{n / 1e6:.2f}", f"{100 * n / r['instructions']:.0f}%"]
                       for path, op, kernel, n in top]
    text = ("Cortex-M4 firmware generated by `--backend mcu` and run under qemu-system-arm "
            "(mps2-an386), one inference on a seeded input. KB = 1024 bytes. **Instructions are "
            "executed-instruction counts from QEMU, not cycles** (QEMU models no pipeline, wait "
            "states or caches). SRAM measured = .data + .bss (arena and the harness's I/O buffers) "
            "+ stack high-water mark (stack painting) + harness heap; 'fits' = within 320 KB SRAM "
            "(stack and heap reserves included) and 1 MB flash. Arena: greedy-by-size plan vs a "
            "naive plan (every tensor its own buffer) vs the lower bound of a sequential schedule "
            "(max live bytes over steps, at least the two largest tensors live together). "
            "MMACs: multiply-accumulates the kernels perform (N:M kernels skip the pruned ones). "
            "'device vs reference': the firmware's output against the artifact's reference "
            "(`gradrewrite run --compare`: int8 must be bit-exact against the integer reference, "
            "fp32 within rounding of the torch graph; int8 graphs with fp32 softmax/GELU/layer norm "
            "between int8 layers are compared by relative error, libm rounding differs). "
            "'change vs fp32 model': relative L2 change of the output against the unquantized, unpruned PyTorch model; N:M here is one-shot magnitude "
            "pruning without fine-tuning, so it changes the outputs a lot (accuracy after sparse "
            "training: see the N:M section). The model input lives in the arena (the harness reads "
            "the input file straight into `model_input_buffer()`), and an int8 graph whose input "
            "only feeds a quantize takes int8 pixels (the host quantizes them, as torch does); "
            "'SRAM measured' still includes the harness's output buffer (the transformer's 64x512 "
            "fp32 logits: 128 KB). 'int8, not streamed': the int8 build without the two int8 memory "
            "rewrites (a depthwise conv written over its dying input through a one-plane scratch; a "
            "pointwise expand conv, dense or N:M-packed, and the depthwise conv after it computed row "
            "by row through three padded rows of every expanded channel, so the expanded tensor is "
            "never stored). The N:M rows run without patches "
            "and are compared with 'int8, no patches'. Every other row uses the backend's defaults, patch-based "
            "execution of the first stage included where it lowers the peak (then the input is read "
            "window by window and not held in SRAM: see the patch section).")
    if quick:
        text += " `--quick`: MobileNetV2 128x128 left out, instructions counted for the small CNN only."
    out = [{"heading": "Flash, SRAM and instructions per inference", "text": text,
            "columns": ["model", "variant", "MMACs", "flash KB", "arena KB", "naive KB", "lower bound KB",
                        "SRAM measured KB", "stack B", "fits", "M instructions", "instr/MAC",
                        "device vs reference", "change vs fp32 model"],
            "rows": table}]
    if ratios:
        out.append({"heading": "Ratios (measured side by side in this run)",
                    "columns": ["model", "comparison", "flash", "SRAM measured", "instructions"],
                    "rows": ratios})
    if patch_rows:
        out.append(patch_rows)
    targets = _targets(by)
    if targets:
        out.append(targets)
    if layers:
        out.append({"heading": "Small CNN: the costliest layers (instructions per layer)",
                    "text": "model_run's kernel calls, counted one by one and matched to the code "
                            "generator's ops in order; a copy before a kernel counts with that kernel.",
                    "columns": ["variant", "layer", "op", "kernel", "M instructions", "share"],
                    "rows": layers})
    if missing:
        out.append({"heading": "Rows not measured",
                    "text": "Configurations the backend could not build in this run, with the reason.",
                    "columns": ["model", "variant", "reason"], "rows": missing})
    if done and not quick:  # save_png writes the published results/mcu.png
        out[0]["image"] = _plot(done)
    return out


def _targets(by: dict) -> dict[str, Any] | None:
    """Issue 18's instruction targets on MobileNetV2-w0.35 96x96 (int8 without patches)."""
    model, limit = INT8_TARGET
    dense = by.get((model, "int8, no patches")) or by.get((model, "int8"))
    if not (dense and dense.get("instructions")):
        return None
    rows = [[f"{model} int8 total ({dense['variant']})", f"<= {limit / 1e6:.0f} M",
             f"{dense['instructions'] / 1e6:.2f} M", "holds" if dense["instructions"] <= limit else "MISSED"]]
    for v, want in NM_TARGETS.items():
        r = by.get((model, v))
        if r and r.get("instructions"):
            got = dense["instructions"] / r["instructions"]
            rows.append([f"{model} {v}: fewer instructions than {dense['variant']}", f">= {want}x", f"{got:.2f}x",
                         "holds" if got >= want else "MISSED"])
    for row in rows:
        print(f"target {row[0]}: {row[2]} ({row[1]}) {row[3]}", flush=True)
    return {"heading": "Instruction targets (issue 18)", "columns": ["target", "wanted", "measured", ""],
            "rows": rows}


def _patch_rows(done: list[dict[str, Any]], by: dict) -> dict[str, Any] | None:
    """Patch-based execution: int8 with patches (the default) against int8 without, per model."""
    table = []
    for model in dict.fromkeys(r["model"] for r in done):
        on, off = by.get((model, "int8")), by.get((model, "int8, no patches"))
        if not (on and off):
            continue
        p = on.get("patches") or {}
        i_on, i_off = on.get("instructions"), off.get("instructions")
        over = f"{100 * (i_on / i_off - 1):+.1f}%" if i_on and i_off else "-"
        read = on.get("input_read_instructions")
        target = ""
        if model == PATCH_TARGET[0]:
            target = ("holds" if on["sram_measured_bytes"] <= PATCH_TARGET[1] and on["device_vs_reference"] == "bit-exact"
                      else "MISSED") + f" (<= {PATCH_TARGET[1] // 1024} KB, bit-exact)"
        table.append([model,
                      (f"{p.get('split_path')} {'x'.join(map(str, p.get('split_shape') or []))}, "
                       f"{'x'.join(map(str, p.get('grid') or []))} patches") if p.get("applied") else "not applied",
                      f"{100 * p['macs_overhead']:.1f}%" if p.get("applied") else "-",
                      _kb(off["arena_bytes"]), _kb(on["arena_bytes"]),
                      _kb(off["sram_measured_bytes"]), _kb(on["sram_measured_bytes"]),
                      _kb(on["sram_measured_bytes"] + (0 if on.get("input_in_sram", True) else on["input_bytes"])),
                      "-" if not i_off else f"{i_off / 1e6:.2f}", "-" if not i_on else f"{i_on / 1e6:.2f}", over,
                      "-" if read is None else f"{read / 1e6:.2f}",
                      f"{on['device_vs_reference']} / {'same' if on['device_vs_reference'] == off['device_vs_reference'] else 'differs'}",
                      target])
        print(f"patches {model}: SRAM measured {_kb(off['sram_measured_bytes'])} -> {_kb(on['sram_measured_bytes'])} KB, "
              f"instructions {over}{', target ' + target if target else ''}", flush=True)
    if not table:
        return None
    return {"heading": "Patch-based execution of the first stage (int8)",
            "text": "The first layers run patch by patch up to the split tensor (MCUNetV2's per-patch "
                    "inference; backend option `patches`, on by default where it lowers the peak): each "
                    "patch computes its receptive field with the halo, so no full high-resolution "
                    "activation is stored; the planner picked the split and the grid with the lowest "
                    "arena within 20% recomputed MACs ('MAC overhead': extra MACs over the whole model's). "
                    "With patches the model reads its input window by window, and the harness reads "
                    "those windows from the input file during `model_run` (as from a camera or a JPEG "
                    "decoder), so **'SRAM measured' with patches holds no copy of the input**; the "
                    "'+ input' column adds the whole input, for an application that keeps the frame in "
                    "SRAM. Without patches the input is in the arena (counted). Instructions: all of "
                    "model_run, the file reads of the input windows included ('input reads': their share; "
                    "semihosting's own work in QEMU is not counted).",
            "columns": ["model", "split, grid", "MAC overhead", "arena KB off", "arena KB on",
                        "SRAM measured KB off", "SRAM measured KB on", "on + input KB",
                        "M instr off", "M instr on", "instr overhead", "M instr input reads",
                        "device vs reference / same as off", "target"],
            "rows": table}


def _plot(rows: list[dict[str, Any]]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {"small CNN": "small CNN", "MobileNetV2-w0.35 96x96": "MbV2 96", "MobileNetV2-w0.35 128x128": "MbV2 128",
             "tiny transformer": "tiny GPT"}
    labels = [next((v for k, v in short.items() if r["model"].startswith(k)), r["model"][:12]) + f"\n{r['variant']}"
              for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.45 * len(rows) + 2), sharey=True)
    y = np.arange(len(rows))
    axes[0].barh(y, [r["flash_bytes"] / 1024 for r in rows], color="tab:blue")
    axes[0].axvline(DEFAULT_FLASH_KB, color="k", ls="--", lw=1)
    axes[0].set_title("flash KB (1 MB budget dashed)")
    axes[1].barh(y - 0.2, [r["arena_bytes"] / 1024 for r in rows], 0.4, label="arena (planned)")
    axes[1].barh(y + 0.2, [r["sram_measured_bytes"] / 1024 for r in rows], 0.4, label="SRAM measured")
    axes[1].axvline(DEFAULT_RAM_KB, color="k", ls="--", lw=1)
    axes[1].set_title("SRAM KB (320 KB budget dashed)")
    axes[1].legend(fontsize=8)
    axes[2].barh(y, [(r.get("instructions") or 0) / 1e6 for r in rows], color="tab:green")
    axes[2].set_title("M instructions per inference (not cycles)")
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    return _report.save_png(fig, "mcu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer models; count instructions on small ones only")
    args = ap.parse_args()
    missing = firmware.toolchain_missing(TARGET)
    if missing:
        sys.exit(f"cannot run: {missing}")
    torch.set_num_threads(1)
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gr-bench-mcu-") as work:
        for name, factory in models(args.quick).items():
            count = not args.quick or name.startswith("small CNN")
            for variant, pipeline in VARIANTS.items():
                if VARIANT_MODELS.get(variant, name) not in name:
                    continue
                t0 = time.perf_counter()
                try:
                    row = measure(name, factory, variant, pipeline, count, Path(work))
                except Exception as exc:  # keep the other rows; this one says what broke
                    row = {"model": name, "variant": variant, "pipeline": pipeline,
                           "missing": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                shown = {k: v for k, v in row.items()
                         if k not in ("instructions_top", "instructions_per_layer", "pipeline")}
                print(json.dumps(shown, default=str), flush=True)
    data = {"title": "MCU backend: flash, SRAM, instructions per inference (Cortex-M4 under QEMU)",
            "quick": args.quick, "target": TARGET, "qemu_machine": "mps2-an386",
            "budget": {"ram_kb": DEFAULT_RAM_KB, "flash_kb": DEFAULT_FLASH_KB},
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "rows": rows, "sections": sections(rows, args.quick)}
    _report.publish("mcu", data, quick=args.quick)


if __name__ == "__main__":
    main()
