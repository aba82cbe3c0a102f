"""Large models on one machine: peak memory and time of `gradrewrite compile` on
random-weight LLMs at real sizes, from transformers model directories (config.json +
model.safetensors), through the bounded-memory path (weights memory-mapped, see
gradrewrite/rewrite/mapped_safetensors.py).

Each compile runs as its own process under ``/usr/bin/time -v`` (peak RSS = its
"Maximum resident set size"); the model's fp32 bytes are the yardstick. Targets
(issue 22): peak RSS <= 1.5x the model's fp32 bytes for every pipeline; time grows at
most linearly with the parameter count.

    python benchmarks/scale.py                     # the Qwen2-0.5B-shaped rows
    python benchmarks/scale.py --models qwen2-0.5b --quick   # results/tmp only

Model directories are written once under benchmarks/results/tmp/scale/ (gitignored),
tensor by tensor (the generator never holds the model: a 3B directory needs no 12 GB).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _report  # noqa: E402

TARGET_RSS = 1.5
MODELS = {   # transformers configs at the shapes of the real checkpoints
    "qwen2-0.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896,
                       intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "llama-3.2-1b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama-3b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=3072,
                     intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                     max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5),
}
PIPELINES = {"fp32": None, "rtn-4bit": "quantize(bits=4,group=128)",
             "gptq-4bit": "quantize(bits=4,group=128,method=gptq)",
             "gwq-4bit": "quantize(bits=4,group=128,outliers=0.01,criterion=gradient)"}
CALIBRATED = ("gptq-4bit", "gwq-4bit")   # GPTQ's Hessians, GWQ's gradients: both layer by layer
CALIBRATION_SAMPLES = 16   # of 1 x 16 token ids, for the pipelines that calibrate
LINEAR_SLACK = 1.10   # "time grows at most linearly": wall per parameter within 10% of the smallest model's
WORK = _report.QUICK / "scale"


def write_model_dir(name: str, path: Path) -> int:
    """config.json + model.safetensors of random weights (N(0, 0.02), norms 1), written
    tensor by tensor from the model's meta shapes; returns the parameter count."""
    import transformers
    from gradrewrite.rewrite.model_dir import parameters_on_meta

    config = transformers.AutoConfig.for_model(**MODELS[name])
    with parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(p.shape) for k, p in model.state_dict().items()
              if k in dict(model.named_parameters())}   # tied weights: stored once
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = math.prod(shape) * 4
        header[k] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "model.safetensors.part"
    gen = torch.Generator().manual_seed(0)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k, shape in shapes.items():
            t = torch.ones(shape) if k.endswith("norm.weight") else \
                torch.zeros(shape) if k.endswith("bias") else torch.randn(shape, generator=gen) * 0.02
            f.write(t.numpy().tobytes())
    tmp.rename(path / "model.safetensors")
    config.save_pretrained(path)
    return sum(math.prod(s) for s in shapes.values())


def calibration_file(model_dir: Path) -> Path:
    """Seeded random token ids (the weights are random too): CALIBRATION_SAMPLES x 1 x 16."""
    path = model_dir / "calibration.npz"
    if not path.is_file():
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        ids = torch.randint(0, vocab, (CALIBRATION_SAMPLES, 1, 16), generator=torch.Generator().manual_seed(0))
        np.savez(path, input_ids=ids.numpy())
    return path


def run_compile(model_dir: Path, pipeline: str, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    passes = PIPELINES[pipeline]
    calib = ["--calib", str(calibration_file(model_dir))] if pipeline in CALIBRATED else []
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "gradrewrite", "compile", str(model_dir), "-b", "ort",
           "-o", str(out), "--quiet"] + (["-p", passes] if passes else []) + calib
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    wall = time.perf_counter() - t0
    peak_kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300], "wall_s": round(wall, 1),
                "peak_rss_bytes": int(peak_kib[1]) * 1024 if peak_kib else None}
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": round(wall, 1), "peak_rss_bytes": int(peak_kib[1]) * 1024,
            "report_memory": report["memory"], "verification": report["verification"],
            "artifact_bytes": sum(report["sizes"].values()), "threads": report["latency_ms"].get("threads")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen2-0.5b", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated: {', '.join(PIPELINES)}")
    ap.add_argument("--quick", action="store_true", help="write results/tmp only (BENCHMARKS.md untouched)")
    ap.add_argument("--republish", action="store_true",
                    help="rebuild the section from the rows in results/scale.json (no compile runs)")
    args = ap.parse_args()
    if args.republish:
        publish(json.loads((_report.RESULTS / "scale.json").read_text())["rows"], quick=args.quick)
        return
    rows = []
    for name in args.models.split(","):
        model_dir = WORK / name
        if not (model_dir / "model.safetensors").is_file():
            print(f"writing {model_dir} …", flush=True)
            write_model_dir(name, model_dir)
        with open(model_dir / "model.safetensors", "rb") as f:   # the header only: the file is GBs
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        params = sum(math.prod(e["shape"]) for k, e in header.items() if k != "__metadata__")
        for pipe in args.pipelines.split(","):
            print(f"{name} {pipe} …", flush=True)
            r = run_compile(model_dir, pipe, WORK / f"out-{name}-{pipe}")
            r.update(model=name, pipeline=pipe, passes=PIPELINES[pipe], parameters=params, fp32_bytes=params * 4,
                     generated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            if r.get("peak_rss_bytes"):
                r["rss_over_fp32"] = round(r["peak_rss_bytes"] / r["fp32_bytes"], 3)
                r["target_holds"] = r["rss_over_fp32"] <= TARGET_RSS and "error" not in r
            print(json.dumps({k: v for k, v in r.items() if k != "report_memory"}), flush=True)
            rows.append(r)
    publish(rows if args.quick else merged(rows), quick=args.quick)


def merged(rows: list[dict]) -> list[dict]:
    """This run's rows over the published ones, one per (model, pipeline), in table order."""
    old = _report.RESULTS / "scale.json"
    by = {(r["model"], r["pipeline"]): r for r in (json.loads(old.read_text())["rows"] if old.exists() else [])}
    by.update({(r["model"], r["pipeline"]): r for r in rows})
    order = {k: i for i, k in enumerate([(m, p) for m in MODELS for p in PIPELINES])}
    return sorted(by.values(), key=lambda r: order.get((r["model"], r["pipeline"]), len(order)))


def linearity(rows: list[dict]) -> list[dict]:
    """Per pipeline with rows for two models or more: wall seconds per million parameters of
    each model against the smallest one's; the target holds when no larger model's rate is
    above the smallest's by more than ``LINEAR_SLACK`` (time at most linear in parameters)."""
    out = []
    for pipe in PIPELINES:
        ok = sorted((r for r in rows if r["pipeline"] == pipe and "error" not in r and r.get("wall_s")),
                    key=lambda r: r["parameters"])
        if len(ok) < 2:
            continue
        rate = [r["wall_s"] / (r["parameters"] / 1e6) for r in ok]
        ratios = [x / rate[0] for x in rate]
        out.append({"pipeline": pipe, "models": [r["model"] for r in ok],
                    "s_per_m_params": [round(x, 4) for x in rate], "over_smallest": [round(x, 3) for x in ratios],
                    "holds": all(x <= LINEAR_SLACK for x in ratios[1:])})
    return out


def publish(rows: list[dict], *, quick: bool) -> None:
    table = [[r["model"], f"{r['parameters'] / 1e6:.0f} M", f"{r['fp32_bytes'] / 2**30:.2f}", r["pipeline"],
              r["wall_s"], f"{r['peak_rss_bytes'] / 2**30:.2f}" if r.get("peak_rss_bytes") else "-",
              f"{r['rss_over_fp32']:.2f}x" if r.get("rss_over_fp32") else "-",
              ("yes" if r.get("target_holds") else "NO") + (f" ({r['error']})" if "error" in r else ""),
              f"{r['artifact_bytes'] / 2**20:.0f}" if r.get("artifact_bytes") else "-",
              f"{r['verification']['relative_error']:.3g}" if r.get("verification") else "-"] for r in rows]
    for line in table:
        print(" | ".join(map(str, line)))
    linear = linearity(rows)
    for g in linear:
        print(f"time at most linear in parameters, {g['pipeline']}: wall s per M params "
              f"{dict(zip(g['models'], g['s_per_m_params']))}, over the smallest {g['over_smallest']}: "
              f"{'holds' if g['holds'] else 'MISSED'} (target <= {LINEAR_SLACK}x)")
    image = _plot(rows)
    m = _report.machine()
    starts = [r["report_memory"]["peak_after_stage"]["start"] for r in rows if r.get("report_memory")]
    base = f"{min(starts) / 2**30:.2f} GiB" if starts else "?"
    text = (f"Random-weight models from `transformers` configs at the real shapes, compiled by "
            f"`gradrewrite compile MODEL_DIR -b ort [-p PIPELINE]` (model directory input: weights "
            f"memory-mapped from model.safetensors and shared with the reference graph; reference "
            f"outputs recorded before lowering; ONNX external data written tensor by tensor), one process "
            f"per row under `/usr/bin/time -v` on {m.get('cpu', '?')} ({m.get('cpu_count')} cores, "
            f"ORT/torch threads: {rows[0].get('threads') if rows else '?'}), machine shared with other jobs. "
            f"Peak RSS counts every resident page of the process (mapped weights included, and the imported "
            f"libraries: the process held {base} when the compile began). Target: peak RSS <= {TARGET_RSS}x the model's fp32 bytes, every pipeline. "
            f"Verification: relative L2 error of the ORT artifact's logits against the float model on "
            f"3 seeded inputs of 16 tokens (lossy for 4-bit). A tied LM head reads the embedding table in "
            f"place (FusedMatMul, transB) and the compile's sessions do not prepack, so the table is held "
            f"once. Rows are merged by (model, pipeline) across runs: each row's `generated` time is in "
            f"results/scale.json. Target 2: time grows at most linearly with the parameter count: a "
            f"pipeline's wall seconds per million parameters on each larger model at most {LINEAR_SLACK}x the "
            f"smallest model's (second table; rows measured at different times and loads, so a noisy judge).")
    data = {"title": "Large models in bounded memory: peak RSS of the compile", "rows": rows,
            "target_rss_over_fp32": TARGET_RSS, "linearity": linear,
            "sections": [{"text": text,
                          "columns": ["model", "params", "fp32 GiB", "pipeline", "wall s", "peak RSS GiB",
                                      "RSS / fp32", f"<= {TARGET_RSS}x", "artifact MiB", "rel. error"],
                          "rows": table, "image": image}]
            + ([{"columns": ["pipeline", "models", "wall s / M params", "over the smallest",
                             f"<= {LINEAR_SLACK}x"],
                 "rows": [[g["pipeline"], ", ".join(g["models"]), ", ".join(map(str, g["s_per_m_params"])),
                           ", ".join(f"{x}x" for x in g["over_smallest"]), "yes" if g["holds"] else "NO"]
                          for g in linear]}] if linear else [])}
    _report.publish("scale", data, quick=quick)


def _plot(rows: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("rss_over_fp32")]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar([f"{r['model']}\n{r['pipeline']}" for r in ok], [r["rss_over_fp32"] for r in ok], color="tab:blue")
    ax.axhline(TARGET_RSS, color="tab:red", linestyle="--", label=f"target {TARGET_RSS}x")
    ax.set_ylabel("peak RSS / fp32 weight bytes")
    ax.legend()
    return _report.save_png(fig, "scale")


if __name__ == "__main__":
    main()
