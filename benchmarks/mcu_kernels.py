"""MCU int8 kernels against CMSIS-NN: instructions per multiply-accumulate, one layer each.

Every row is a one-layer model at a MobileNetV2-w0.35 layer shape (plus the expand conv
and a 448-input classifier), quantized with ``quantize(mode=static)`` and compiled with
``gr.compile(..., backend="mcu", target="host")`` (the host build is checked bit-exact
against the integer reference), then linked for Cortex-M4 and Cortex-M7 and run once
under qemu-system-arm. The number is the executed instructions of the layer's kernel
call (QEMU's translation-block log, per call; not cycles) divided by its MACs.

The peer column is Arm CMSIS-NN at the same shapes, built with the same flags (-O2,
DSP) and counted with the same counters, measured on this machine kind (the project's
anchors, ``shared/ANCHORS.md`` "Cortex-M int8 kernels"): the figures are copied below,
nothing is downloaded. Target per row: ours <= CMSIS-NN. "kernel .text" is the code of
gr_int8.c that the firmware links (``--gc-sections`` keeps only what the model calls).

    python benchmarks/mcu_kernels.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradrewrite as gr  # noqa: E402
from benchmarks import _report  # noqa: E402
from gradrewrite.backends.mcu.firmware import build as firmware, qemu  # noqa: E402
from gradrewrite.backends.mcu.packing import pack_inputs  # noqa: E402
from gradrewrite.backends.mcu.targets import BOARD_FLASH_KB, BOARD_RAM_KB  # noqa: E402

TARGETS = ("cortex-m4", "cortex-m7")
KERNEL_FILE = "gr_int8.c"


def _conv(cin, cout, k, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


# (row, model factory, input shape, CMSIS-NN instructions/MAC on M4, on M7; None: not measured)
ROWS = [
    ("pointwise 16x16x48->16", lambda: _conv(48, 16, 1, act=False), (1, 48, 16, 16), 2.28, 2.24),
    ("pointwise 16x16x16->96 (expand)", lambda: _conv(16, 96, 1), (1, 16, 16, 16), 3.97, 3.93),
    ("pointwise 8x8x96->24", lambda: _conv(96, 24, 1, act=False), (1, 96, 8, 8), 1.90, 1.86),
    ("pointwise 3x3x112->1280 (head)", lambda: _conv(112, 1280, 1), (1, 112, 3, 3), 2.20, None),
    ("depthwise 3x3 16x16x96 stride 1", lambda: _conv(96, 96, 3, 1, 96), (1, 96, 16, 16), 7.93, 7.93),
    ("depthwise 3x3 16x16x96 stride 2", lambda: _conv(96, 96, 3, 2, 96), (1, 96, 16, 16), 7.93, 7.94),
    ("conv 3x3 s2 96x96x3->16 (first conv)", lambda: _conv(3, 16, 3, 2), (1, 3, 96, 96), 4.77, 4.88),
    ("fully connected 1280->10", lambda: nn.Linear(1280, 10), (1, 1280), 1.93, 1.93),
    ("fully connected 448->10", lambda: nn.Linear(448, 10), (1, 448), 2.03, 2.03),
]
QUICK = {"pointwise 8x8x96->24", "depthwise 3x3 16x16x96 stride 2", "fully connected 448->10"}


def _kernel_text(elf: Path, obj_symbols: set[str]) -> int:
    """Bytes of the linked functions that gr_int8.c defines."""
    out = subprocess.run(["arm-none-eabi-nm", "-S", "--defined-only", str(elf)], capture_output=True,
                         text=True, check=True).stdout
    total = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "tT" and parts[3] in obj_symbols:
            total += int(parts[1], 16)
    return total


def _object_symbols(project: Path) -> set[str]:
    """Function names defined in the kernel file (compiled for the host: names only)."""
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "k.o"
        subprocess.run(["arm-none-eabi-gcc", "-O2", "-mcpu=cortex-m4", "-mthumb", "-c", "-I", str(project / "kernels"),
                        str(project / "kernels" / KERNEL_FILE), "-o", str(obj)], check=True)
        out = subprocess.run(["arm-none-eabi-nm", "--defined-only", str(obj)], capture_output=True, text=True,
                             check=True).stdout
    return {p[2] for p in (l.split() for l in out.splitlines()) if len(p) == 3 and p[1] in "tT"}


def measure(name: str, factory, shape, work: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(shape)
    gen = torch.Generator().manual_seed(7)
    calib = [(torch.randn(shape, generator=gen),) for _ in range(8)]
    out = work / name.replace(" ", "_").replace(">", "").replace("(", "").replace(")", "")
    # stream=False: a lone depthwise conv keeps its own output buffer (no in-place plane copies)
    gr.compile(model, out, example_inputs=(x,), passes="quantize(mode=static)", backend="mcu",
               calibration=calib, backend_options={"target": "host", "stream": False},
               verify_inputs=1, latency_runs=0)
    project = out / "mcu"
    facts = json.loads((project / "model.json").read_text())
    mac_ops = [op for op in facts["ops"] if op.get("macs")]
    assert len(mac_ops) == 1, mac_ops
    op = mac_ops[0]
    data = pack_inputs([x.numpy()], facts["inputs"])
    host = firmware.run_host(project / firmware.HOST_EXE, data)
    symbols = _object_symbols(project)
    row: dict[str, Any] = {"kernel": op["kernel"], "macs": op["macs"]}
    for target in TARGETS:
        # the whole emulated board as the budget: the first conv's fp32 example input alone is 108 KB
        fw = firmware.build_firmware(project, target, ram_kb=BOARD_RAM_KB, flash_kb=BOARD_FLASH_KB)
        raw, stats = qemu.run_firmware(fw.elf, data, target, count_instructions=True, per_symbol=True)
        # the kernel call alone (a quantize before it or a copy after it is not the kernel)
        calls = [c for c in stats["instructions_per_call"] if c["function"] == op["kernel"]]
        if len(calls) != 1:
            raise RuntimeError(f"{name}: expected one call of {op['kernel']}: {stats['instructions_per_call']}")
        n = calls[0]["instructions"]
        row[target] = {"instructions": n, "instructions_per_mac": n / op["macs"],
                       "kernel_text_bytes": _kernel_text(fw.elf, symbols), "device_equals_host": raw == host}
    return row


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def sections(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for r in rows:
        if "missing" in r:
            table.append([r["row"], "-", "-", "-", "-", "-", "-", "-", f"not measured: {r['missing']}"])
            continue
        cells = [r["row"], r["kernel"]]
        verdicts = []
        for t, peer in (("cortex-m4", r["cmsis_m4"]), ("cortex-m7", r["cmsis_m7"])):
            ours = r[t]["instructions_per_mac"]
            cells += [f"{ours:.2f}", _fmt(peer)]
            verdicts.append("-" if peer is None else ("yes" if ours <= peer else f"no ({ours / peer:.2f}x)"))
        cells += [f"{r['cortex-m4']['kernel_text_bytes']}", " / ".join(verdicts)]
        table.append(cells)
    text = ("One int8 layer per row (`quantize(mode=static)`, compiled with `--backend mcu`), run once "
            "under qemu-system-arm (mps2-an386 for Cortex-M4, mps2-an500 for Cortex-M7, gcc -O2 with "
            "the DSP extension). **Executed instructions of the layer's kernel call per "
            "multiply-accumulate, from QEMU's translation-block log: instruction counts, not cycles.** "
            "CMSIS-NN: Arm's kernels (HEAD 99f736a) at the same shapes, built with the same flags and "
            "counted the same way, measured on this machine kind (the project's anchor figures; "
            "NHWC layout, while gradrewrite's kernels are NCHW). 'holds': ours <= CMSIS-NN, M4 / M7. "
            "kernel .text: bytes of gr_int8.c's functions linked into the M4 firmware. Every "
            "firmware's output equals the host build's, which compile checked bit-exact against "
            "the integer reference.")
    out = [{"heading": "int8 kernels vs CMSIS-NN (instructions per MAC)", "text": text,
            "columns": ["kernel / shape", "kernel", "M4", "CMSIS-NN M4", "M7", "CMSIS-NN M7",
                        "kernel .text B", "holds (M4 / M7)"],
            "rows": table}]
    done = [r for r in rows if "missing" not in r]
    if done:
        out[0]["image"] = _plot(done)
    return out


def _plot(rows: list[dict[str, Any]]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 0.5 * len(rows) + 1.8), sharey=True)
    y = np.arange(len(rows))
    for ax, (t, key) in zip(axes, (("cortex-m4", "cmsis_m4"), ("cortex-m7", "cmsis_m7"))):
        ax.barh(y - 0.2, [r[t]["instructions_per_mac"] for r in rows], 0.4, label="gradrewrite")
        ax.barh(y + 0.2, [r[key] or 0 for r in rows], 0.4, label="CMSIS-NN (anchor)", color="tab:gray")
        ax.set_title(f"{t}: instructions per MAC (not cycles)")
        ax.legend(fontsize=8)
    axes[0].set_yticks(y, [r["row"] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    return _report.save_png(fig, "mcu_kernels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three rows only; results go to results/tmp")
    args = ap.parse_args()
    for t in TARGETS:
        missing = firmware.toolchain_missing(t)
        if missing:
            sys.exit(f"cannot run: {missing}")
    torch.set_num_threads(1)
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gr-bench-kernels-") as work:
        for name, factory, shape, m4, m7 in ROWS:
            if args.quick and name not in QUICK:
                continue
            row: dict[str, Any] = {"row": name, "input_shape": list(shape), "cmsis_m4": m4, "cmsis_m7": m7}
            t0 = time.perf_counter()
            try:
                row.update(measure(name, factory, shape, Path(work)))
            except Exception as exc:  # keep the other rows; this one says what broke
                row["missing"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            if "missing" in row:
                print(f"{name}: NOT MEASURED ({row['missing']})", flush=True)
                continue
            for t, peer in (("cortex-m4", m4), ("cortex-m7", m7)):
                ours = row[t]["instructions_per_mac"]
                verdict = "no peer figure" if peer is None else (
                    "target holds" if ours <= peer else f"target MISSED ({ours / peer:.2f}x)")
                same = "" if row[t]["device_equals_host"] else "  DEVICE != HOST"
                print(f"{name:40s} {t}: {ours:.2f} instr/MAC vs CMSIS-NN {_fmt(peer)}: {verdict}{same}",
                      flush=True)
    data = {"title": "MCU int8 kernels vs CMSIS-NN: instructions per MAC (Cortex-M4/M7 under QEMU)",
            "quick": args.quick, "targets": list(TARGETS),
            "peer": "Arm CMSIS-NN HEAD 99f736a, -O2, DSP; measured on this machine kind (shared/ANCHORS.md)",
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "rows": rows, "sections": sections(rows)}
    _report.publish("mcu_kernels", data, quick=args.quick)


if __name__ == "__main__":
    main()
