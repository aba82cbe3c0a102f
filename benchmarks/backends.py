"""Compile cost and inference latency of the core pipeline on the example models.

For each example model: the time to capture, run `fold-bn,dce`, and lower to each
backend; then batch-1 latency of the original eager model, the torch artifact and
the ONNX Runtime artifact, timed round-robin in one process (medians, ratios to
eager). 2 threads everywhere. Writes results/backends.json + backends.png and
regenerates BENCHMARKS.md.

    python benchmarks/backends.py [--runs 100]
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
import gradrewrite as gr  # noqa: E402
from benchmarks import _report  # noqa: E402
from examples import models  # noqa: E402

MODELS = {"small_cnn": models.small_cnn, "mobilenet_v2": models.mobilenet_v2, "tiny_gpt": models.tiny_gpt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows_lat, rows_cost, records = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, factory in MODELS.items():
            model, inputs = factory()
            t0 = time.perf_counter()
            graph = gr.capture(model, inputs, source=name)
            capture_s = time.perf_counter() - t0
            arts, cost = {}, {"capture_s": capture_s}
            for backend in ("torch", "ort"):
                t0 = time.perf_counter()
                arts[backend] = gr.compile(graph, Path(tmp) / f"{name}-{backend}", passes="fold-bn,dce",
                                           backend=backend, latency_runs=0)
                cost[f"compile_{backend}_s"] = time.perf_counter() - t0
                cost[f"build_{backend}_s"] = arts[backend].report["build_seconds"]
            rep = arts["ort"].report
            cost["passes_s"] = sum(p["seconds"] for p in rep["passes"])
            np_inputs = [t.numpy() for t in inputs]
            torch_runner = arts["torch"]._run()
            ort_runner = arts["ort"]._run()

            def eager():
                with torch.no_grad():
                    model(*inputs)

            lat = _report.interleaved_medians({
                "eager": eager,
                "torch artifact": lambda: torch_runner(*np_inputs),
                "ort artifact": lambda: ort_runner(*np_inputs),
            }, runs=args.runs)
            base = lat["eager"]["median_ms"]
            records[name] = {"latency": lat, "cost": cost, "nodes": rep["nodes"],
                             "verification": {b: a.report["verification"] for b, a in arts.items()}}
            rows_lat.append([name, base, lat["torch artifact"]["median_ms"], lat["ort artifact"]["median_ms"],
                             base / lat["ort artifact"]["median_ms"],
                             f"{rep['verification']['max_abs_error']:.2g}"])
            rows_cost.append([name, f"{rep['nodes']['before']} → {rep['nodes']['after']}", capture_s,
                              cost["passes_s"], cost["build_torch_s"], cost["build_ort_s"]])
            print(f"{name}: eager {base:.3f} ms, ort {lat['ort artifact']['median_ms']:.3f} ms", flush=True)

    png = _plot(records)
    sections = [
        {"heading": "Batch-1 latency (ms, median)",
         "text": f"{args.runs} interleaved runs after warm-up, 2 threads. `torch artifact` runs the "
                 "rewritten torch.export program; `ort artifact` the ONNX model in ONNX Runtime (CPU "
                 "provider). Max abs error: ORT artifact vs the original model over 3 seeded inputs.",
         "columns": ["model", "eager", "torch artifact", "ort artifact", "eager / ort", "max abs error"],
         "rows": rows_lat, "image": png},
        {"heading": "Compile cost (s)",
         "text": "Pipeline `fold-bn,dce`. Build = backend lowering only (torch.export save, or ONNX "
                 "export + optimisation + session check).",
         "columns": ["model", "compute nodes", "capture", "passes", "build torch", "build ort"],
         "rows": rows_cost},
    ]
    _report.publish("backends", {"title": "Core pipeline: compile cost and backend latency",
                                 "runs": args.runs, "models": records, "sections": sections})


def _plot(records) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(records)
    kinds = ["eager", "torch artifact", "ort artifact"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.27
    for i, kind in enumerate(kinds):
        vals = [records[n]["latency"][kind]["median_ms"] for n in names]
        ax.bar(np.arange(len(names)) + (i - 1) * width, vals, width, label=kind)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("batch-1 latency, ms (median, log scale)")
    ax.set_title("Example models: eager vs artifacts (2 threads)")
    ax.legend()
    return _report.save_png(fig, "backends")


if __name__ == "__main__":
    main()
