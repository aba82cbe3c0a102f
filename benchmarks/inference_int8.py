"""Static int8 inference: ONNX Runtime QDQ vs TVM int8 (untuned / tuned) vs TVM fp32.

For each model (batch 1): capture once; quantize a copy with `fold-bn,quantize(mode=static)`
on seeded calibration inputs; lower the int8 graph to ORT (QDQ: ORT runs QLinearConv /
QLinearMatMul) and to TVM (int8 x int8 -> int32 conv/matmul + integer requantization,
untuned and MetaSchedule-tuned), and the fp32 graph (`fold-bn,dce`) to ORT and TVM
(untuned and tuned with the same budget). Every candidate is timed round-robin in this
one process with 2 threads everywhere. Numerics: each int8 artifact against the torch
backend's fake-quant result (relative L2 error) and the TVM int8 outputs against
`rewrite.int8_layers.integer_reference` (count of output values that differ: 0 = bit-exact),
and ORT's int8 outputs too.
Tuning starts from an empty database each run (``benchmarks/results/tmp/tvm_cache_int8``), so
a ``tuned N`` build carries exactly N trials (a larger budget tunes only the difference).

    nice -n 10 python benchmarks/inference_int8.py [--quick] [--trials 64,192] [--runs 50]
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")   # see inference.py: no spinning pools
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradrewrite as gr  # noqa: E402
from benchmarks import _report  # noqa: E402
from benchmarks.inference import _ort_runner, _first_line  # noqa: E402
from examples import models  # noqa: E402
from gradrewrite.rewrite import int8_layers as int8  # noqa: E402
from gradrewrite.backends.mcu.inference.reference import INT8_REL_TOL  # noqa: E402
from gradrewrite.rewrite.registry import PassContext  # noqa: E402

THREADS = 2
TMP = _report.QUICK
# own cache, emptied per run: a cached rerun reuses the largest database recorded, and fp32
# and int8 must each carry exactly the budget of their column
TVM_CACHE = TMP / "tvm_cache_int8"
CALIB_SAMPLES = 8
CHECK_INPUTS = 3
MODELS = {
    "small_cnn": (lambda: models.small_cnn(), "3x32x32"),
    "mobilenet_v2": (lambda: models.mobilenet_v2(width_mult=0.35, resolution=128), "w0.35, 3x128x128"),
}


def _randn(shape, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def measure(name: str, trials: list[int], runs: int, work: Path) -> dict:
    t_cell = time.perf_counter()
    model, (x,) = MODELS[name][0]()
    graph = gr.capture(model, (x,), source=name)
    qgraph = graph.clone()
    calib = [(t,) for t in _randn(x.shape, CALIB_SAMPLES, 0)]
    gr.run_pipeline(qgraph, "fold-bn,quantize(mode=static)", verify=False,
                    ctx=PassContext(seed=0, calibration=calib))
    fgraph = graph.clone()
    gr.run_pipeline(fgraph, "fold-bn,dce", verify=False)
    rec = {"model": name, "input": list(x.shape), "compile_s": {}, "errors": {}, "tuning": {}, "numerics": {}}
    arts = {}

    def build(label, g, backend, opts=None):
        t0 = time.perf_counter()
        try:
            arts[label] = gr.compile(g, work / f"{name}-{label.replace(' ', '_')}", backend=backend,
                                     backend_options=opts or {}, latency_runs=0, verify_inputs=1,
                                     rel_tol=INT8_REL_TOL if "int8" in label else 1e-4, force=True)
        except Exception as exc:  # noqa: BLE001
            rec["errors"][label] = _first_line(exc)
            print(f"  {label} failed: {rec['errors'][label]}", flush=True)
            return
        rec["compile_s"][label] = time.perf_counter() - t0
        tuning = arts[label].report["artifact"].get("tuning")
        if tuning:
            rec["tuning"][label] = {k: tuning.get(k) for k in ("new_trials", "trials_recorded", "tuning_seconds",
                                                                "tasks", "reused_cache")}
            rec["tuning"][label]["tasks_tuned"] = len(tuning.get("tasks_tuned") or [])
        print(f"  {label}: built in {rec['compile_s'][label]:.1f} s", flush=True)

    tvm = {"target": "llvm", "num_cores": THREADS, "tune_cache": str(TVM_CACHE)}
    build("ort fp32", fgraph, "ort")
    build("ort int8", qgraph, "ort")
    build("tvm fp32 untuned", fgraph, "tvm", {**tvm, "tune_trials": 0})
    build("tvm int8 untuned", qgraph, "tvm", {**tvm, "tune_trials": 0})
    for n in trials:
        build(f"tvm fp32 tuned {n}", fgraph, "tvm", {**tvm, "tune_trials": n})
        build(f"tvm int8 tuned {n}", qgraph, "tvm", {**tvm, "tune_trials": n})
    if "tvm int8 untuned" in arts:
        rec["int8_layers"] = arts["tvm int8 untuned"].report["artifact"]["quantized"]["int8_layers"]
        rec["nodes_int8"] = arts["tvm int8 untuned"].report["nodes"]["after"]

    # numerics on fresh inputs: int8 candidates vs the torch fake-quant graph; TVM int8 vs the
    # integer reference (bit-exact expected); fp32 candidates vs the original model
    checks = _randn(x.shape, CHECK_INPUTS, 100)
    for label, art in arts.items():
        is_int8 = "int8" in label
        rel, mism, total = [], 0, 0
        for t in checks:
            got = np.asarray(art(t.numpy())[0])
            ref = (qgraph if is_int8 else graph)(t)[0].numpy()
            rel.append(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
            if is_int8:
                exact = int8.integer_reference(qgraph, t)[0].numpy()
                mism += int(np.count_nonzero(got != exact))
                total += exact.size
        rec["numerics"][label] = {"vs": "torch fake-quant" if is_int8 else "original fp32",
                                  "max_relative_error": max(rel)}
        if total:
            rec["numerics"][label].update(integer_reference_mismatches=mism, values=total)

    inp = [np.ascontiguousarray(x.numpy())]

    def eager():
        with torch.no_grad():
            model(x)
    cands = {"eager fp32": eager}
    for label, art in arts.items():
        run = _ort_runner(art) if label.startswith("ort") else art._run()
        cands[label] = (lambda r: (lambda: r(*inp)))(run)
    rec["latency"] = _report.interleaved_medians(cands, runs=runs, warmup=3)
    rec["cell_s"] = time.perf_counter() - t_cell
    print(f"{name}: " + ", ".join(f"{k} {v['median_ms']:.3g}" for k, v in rec["latency"].items())
          + f" ms ({rec['cell_s']:.0f} s)", flush=True)
    return rec


def _plot(records, cols, path: Path) -> str:
    return _report.latency_bars(records, cols, [r["model"] for r in records], path,
                                title=f"Static int8 vs fp32, batch 1, CPU, {THREADS} threads", figsize=(9, 4.2),
                                hatch=lambda c: "//" if "int8" in c else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: small_cnn only, 8 trials, 10 runs; writes under results/tmp/")
    ap.add_argument("--trials", default="64,192", help="MetaSchedule trial budgets per tuned TVM build")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    if args.quick:
        args.models, args.trials, args.runs = "small_cnn", "8", 10
    trials = sorted(int(v) for v in args.trials.split(",") if v.strip())
    torch.set_num_threads(THREADS)
    shutil.rmtree(TVM_CACHE, ignore_errors=True)
    TVM_CACHE.mkdir(parents=True, exist_ok=True)
    work = TMP / "inference_int8_artifacts"
    t_start = time.perf_counter()
    records = []
    for name in [n for n in args.models.split(",") if n]:
        print(f"== {name} ({time.perf_counter() - t_start:.0f} s elapsed)", flush=True)
        records.append(measure(name, trials, args.runs, work))
    shutil.rmtree(work, ignore_errors=True)
    total_s = time.perf_counter() - t_start

    cols = ["eager fp32", "ort fp32", "ort int8", "tvm fp32 untuned", "tvm int8 untuned",
            *[f"tvm {p} tuned {n}" for n in trials for p in ("fp32", "int8")]]
    lat = lambda r, c: r["latency"][c]["median_ms"] if c in r["latency"] else "—"  # noqa: E731

    def ratio(r, a, b):
        la, lb = r["latency"].get(a), r["latency"].get(b)
        return f"{la['median_ms'] / lb['median_ms']:.2f}x" if la and lb else "—"
    med_rows = [[r["model"], MODELS[r["model"]][1], *[lat(r, c) for c in cols]] for r in records]
    pairs = [("tvm int8 untuned", "tvm fp32 untuned"),
             *[(f"tvm int8 tuned {n}", f"tvm fp32 tuned {n}") for n in trials],
             *[(f"tvm int8 tuned {n}", "ort int8") for n in trials[-1:]], ("ort int8", "ort fp32")]
    ratio_rows = [[r["model"], *[ratio(r, a, b) for a, b in pairs]] for r in records]
    num_rows = []
    for r in records:
        for label, n in r["numerics"].items():
            exact = (f"{n['integer_reference_mismatches']} / {n['values']}" if "values" in n else "—")
            num_rows.append([r["model"], label, n["vs"], n["max_relative_error"], exact])
    cost_rows = [[r["model"], label, tu["new_trials"], tu["trials_recorded"], f"{tu['tasks_tuned']}/{tu['tasks']}",
                  float(tu["tuning_seconds"] or 0.0), float(r["compile_s"][label])]
                 for r in records for label, tu in r["tuning"].items()]
    layer_rows = [[r["model"], ", ".join(f"{k} {v}" for k, v in r.get("int8_layers", {}).items())] for r in records]
    out_dir = TMP if args.quick else _report.RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    png = _plot(records, cols, out_dir / ("inference_int8_quick.png" if args.quick else "inference_int8.png"))
    m = _report.machine()
    failed = "; ".join(f"{r['model']} {k}: {v}" for r in records for k, v in r["errors"].items())
    sections = [
        {"heading": "Latency (ms, median, batch 1)",
         "text": (f"CPU only: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores shared with other jobs, "
                  f"{THREADS} threads everywhere, no spinning thread pools. `int8` = "
                  "`fold-bn,quantize(mode=static)` on "
                  f"{CALIB_SAMPLES} seeded random calibration inputs (minmax observers): ORT runs the QDQ "
                  "model with its int8 kernels; TVM lowers each int8 conv/linear/add chain to int8 x int8 -> "
                  "int32 Relax compute plus integer requantization (`backends/tvm/int8_ops.py`, "
                  "`int8_relax.py`). `fp32` = `fold-bn,dce`. `tuned N` = MetaSchedule, N trials for the whole "
                  "model, from an empty database (a larger budget adds trials to the smaller one's). "
                  "All candidates of one row timed round-robin "
                  f"in one process, {args.runs} runs after warm-up."
                  + (f" Failed: {failed}." if failed else "")),
         "columns": ["model", "input", *cols], "rows": med_rows, "image": png},
        {"heading": "Ratios (latency / latency; < 1 means the first is faster)",
         "columns": ["model", *[f"{a} / {b}" for a, b in pairs]], "rows": ratio_rows},
        {"heading": "Numerics",
         "text": (f"{CHECK_INPUTS} fresh seeded inputs per model. int8 candidates against the torch backend's "
                  "fake-quant graph (float conv on dequantized values, so rounding of the requantization "
                  "differs by up to one step); int8 candidates also against the integer reference "
                  "(`backends/mcu/int8.integer_reference`, the arithmetic the mcu C kernels match): "
                  "output values that differ, 0 = bit-exact. fp32 candidates against the original model."),
         "columns": ["model", "candidate", "reference", "max relative L2 error", "integer reference mismatches"],
         "rows": num_rows},
        {"heading": "Layers lowered to integer compute in TVM",
         "text": "Other quantized chains (e.g. MobileNetV2 residual adds whose output feeds two layers) "
                 "run in fp32 between quantize/dequantize.",
         "columns": ["model", "int8 layers"], "rows": layer_rows},
        {"heading": "TVM tuning cost",
         "columns": ["model", "build", "new trials", "trials recorded", "tasks tuned", "tuning s", "compile s"],
         "rows": cost_rows},
    ]
    data = {"title": "Static int8 inference: ORT QDQ vs TVM int8 vs TVM fp32", "runs": args.runs,
            "trials": trials, "threads": THREADS, "total_seconds": total_s, "records": records, "sections": sections}
    print(f"total {total_s:.0f} s")
    _report.publish("inference_int8", data, quick=args.quick)


if __name__ == "__main__":
    main()
