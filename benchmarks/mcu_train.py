"""On-device training firmware: SRAM, flash, stack and instructions per SGD step on Cortex-M.

The small CNN (batch norm folded, batch 1, 3x32x32) captured as one training step
(cross-entropy, SGD), pruned by a sparse-update scheme (or not: full update), lowered
to ``model_train_step`` and linked as ``train.elf`` (``train_host.compile_train`` with
the whole emulated board as the budget, so over-budget schemes are still measured;
"fits" is against the default 320 KB SRAM / 1 MB flash). One step runs under
qemu-system-arm on a seeded batch:

- SRAM: .data (trained parameters) + .bss (the step's arena, harness buffers) + heap
  and stack reserves of train.elf; flash: its .text + .rodata + .data image;
- stack: model_train_step's high-water mark (stack painting);
- instructions per step: executed instructions of one model_train_step (QEMU's
  translation-block log), next to one inference (model_run of firmware.elf, same
  project). Instruction counts, not cycles: QEMU models no pipeline, wait states or
  caches.

    python benchmarks/mcu_train.py [--quick]     (--quick: two schemes, cortex-m4 only)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _report  # noqa: E402
from examples.models import small_cnn  # noqa: E402
from gradrewrite.backends.mcu.firmware.qemu import measure  # noqa: E402
from gradrewrite.backends.mcu.targets import BOARD_FLASH_KB, BOARD_RAM_KB, DEFAULT_FLASH_KB, DEFAULT_RAM_KB  # noqa: E402
from gradrewrite.backends.mcu.training.compile import compile_train  # noqa: E402
from gradrewrite.compiler import run_pipeline  # noqa: E402
from gradrewrite.rewrite.capture import capture  # noqa: E402
from gradrewrite.rewrite.train_step import capture_train_step  # noqa: E402

SCHEMES = {
    "head only": "sparse-update(bias_last=1,weights='-1:1')",
    "head + 1/2 conv, 2 biases": "sparse-update(bias_last=2,weights='-1:1,-2:1/2')",
    "deeper: 3 layers, 5 biases": "sparse-update(bias_last=5,weights='-1:1,-2:1,-3:1/4')",
    "full update": None,
}
QUICK_SCHEMES = ["head only", "head + 1/2 conv, 2 biases"]
LR = 0.05


def step_graph(scheme: str | None):
    model, (x,) = small_cnn()
    graph = capture(model, (x,))
    run_pipeline(graph, "fold-bn", verify=False)
    step = capture_train_step(graph, "cross_entropy", (x, torch.tensor([3])), lr=LR)
    if scheme:
        run_pipeline(step, scheme, verify=False)
    return step


def measure_scheme(name: str, scheme: str | None, target: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="gr-bench-train-") as tmp:
        project = Path(tmp) / "mcu"
        t0 = time.perf_counter()
        facts = compile_train(step_graph(scheme), project, target=target, ram_kb=BOARD_RAM_KB,
                              flash_kb=BOARD_FLASH_KB)
        seconds = time.perf_counter() - t0
        sample = np.ascontiguousarray(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
                                      .numpy()).tobytes()
        inference = measure(project, target, sample)   # model_run of firmware.elf, same project
    fw, rt = facts["firmware"], facts["runtime"]
    return {"scheme": name, "pipeline": scheme or "(full update)", "target": target,
            "trained_bytes": facts["trained_bytes"], "arena_bytes": fw["arena_bytes"],
            "sram_bytes": fw["sram_bytes"], "flash_bytes": fw["flash_bytes"],
            "fits_default": fw["sram_bytes"] <= DEFAULT_RAM_KB * 1024 and fw["flash_bytes"] <= DEFAULT_FLASH_KB * 1024,
            "stack_step_bytes": rt["stack_step_bytes"], "instructions_per_step": rt["instructions_per_step"],
            "instructions_per_inference": inference["instructions"],
            "top_functions": dict(list(rt["instructions_per_symbol"].items())[:5]),
            "compile_and_measure_s": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two schemes, cortex-m4 only")
    args = ap.parse_args()
    names = QUICK_SCHEMES if args.quick else list(SCHEMES)
    targets = ["cortex-m4"] if args.quick else ["cortex-m4", "cortex-m7"]
    results = []
    for target in targets:
        for name in names:
            r = measure_scheme(name, SCHEMES[name], target)
            print(f"{target} {name}: SRAM {r['sram_bytes'] / 1024:.1f} KB, {r['instructions_per_step'] / 1e6:.1f} M "
                  f"instructions/step ({r['instructions_per_step'] / r['instructions_per_inference']:.2f}x inference)",
                  flush=True)
            results.append(r)
    rows = [[r["target"], r["scheme"], round(r["trained_bytes"] / 1024, 1), round(r["arena_bytes"] / 1024, 1),
             round(r["sram_bytes"] / 1024, 1), round(r["flash_bytes"] / 1024, 1), "yes" if r["fits_default"] else "no",
             r["stack_step_bytes"], round(r["instructions_per_step"] / 1e6, 2),
             round(r["instructions_per_step"] / r["instructions_per_inference"], 2)] for r in results]
    text = ("small CNN, batch norm folded, batch 1, fp32, one SGD step (cross-entropy) per call of "
            "`model_train_step` in `train.elf` under QEMU. SRAM = .data (trained parameters) + .bss (the "
            "step's arena) + 4 KB heap + 8 KB stack reserves; 'fits' is against 320 KB SRAM / 1 MB flash. "
            "Instructions are executed instructions (QEMU TB log), a proxy for time, not cycles; "
            "'x inference' divides by one model_run of the same project's firmware.elf.")
    if args.quick:
        text += " `--quick`: two schemes, cortex-m4 only."
    data = {"title": "On-device training firmware (mcu, QEMU)", "quick": args.quick, "results": results,
            "sections": [{"heading": "Training step on Cortex-M: memory and instructions per step", "text": text,
                          "columns": ["target", "scheme", "trained KB", "arena KB", "SRAM KB", "flash KB",
                                      "fits", "stack B", "M instr/step", "x inference"],
                          "rows": rows}]}
    if not args.quick:
        data["sections"][0]["image"] = plot(results)
    _report.publish("mcu_train", data, quick=args.quick)


def plot(results: list[dict]) -> str:
    """SRAM and instructions per step of every scheme on the first target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = [r for r in results if r["target"] == results[0]["target"]]
    names = [r["scheme"] for r in first]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.barh(names, [r["sram_bytes"] / 1024 for r in first], color="tab:blue")
    ax1.axvline(DEFAULT_RAM_KB, color="k", ls="--", lw=1, label=f"{DEFAULT_RAM_KB} KB budget")
    ax1.set_xlabel("train.elf SRAM (KB)")
    ax1.legend(loc="lower right")
    ax2.barh(names, [r["instructions_per_step"] / 1e6 for r in first], color="tab:orange", label="SGD step")
    ax2.barh(names, [r["instructions_per_inference"] / 1e6 for r in first], color="tab:gray", height=0.4,
             label="one inference")
    ax2.set_xlabel("instructions (M, QEMU)")
    ax2.set_yticks([])
    ax2.legend(loc="lower right")
    fig.suptitle(f"small CNN training step on {results[0]['target']} (batch 1, fp32)")
    return _report.save_png(fig, "mcu_train")


if __name__ == "__main__":
    main()
