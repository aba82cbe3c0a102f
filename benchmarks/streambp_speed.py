"""StreamBP step time against gradient checkpointing (issue 20's speed target).

Model (the issue's): Llama-like (transformers), hidden 512, 8 layers, GQA 8 query / 2
key-value heads, MLP 1376, vocabulary 32000, fp32, batch 1, random weights. One step =
forward + next-token loss + backward into ``.grad``:

- plain: ``loss.backward()`` (only up to ``--plain-max`` tokens: it holds every
  activation and the full logits);
- checkpoint: HF ``gradient_checkpointing_enable`` (non-reentrant);
- stream-bp/N: ``StreamBP(model, n_chunks=N).backward(ids)``.

Timing: the methods run round-robin in one process (so machine noise hits them alike),
one torch thread, after one warm-up step each; the process's CPU time and wall time of
every step are recorded. Reported: medians over the rounds, and the ratio to
checkpointing paired round by round (the median over rounds of a method's step over
checkpointing's step in the same round). On a shared machine CPU time is the
comparison to read: wall time includes the time other jobs hold the cores.

A run of some lengths replaces those rows of the published results and keeps the
others (each row stamped with the time it was measured).

    python benchmarks/streambp_speed.py                      # T = 4096, 8192, 16384
    python benchmarks/streambp_speed.py --lengths 4096 --rounds 5
    python benchmarks/streambp_speed.py --quick              # T = 1024, smoke run
    python benchmarks/streambp_speed.py --lengths 4096 --baseline HEAD~1
        # also stream-bp as of a git revision, timed in the same rounds (paired A/B)
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _report  # noqa: E402
from gradrewrite.passes.stream_bp import StreamBP, causal_lm_loss  # noqa: E402

VOCAB = 32000
CONFIG = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=2)
MODEL = "Llama-like d=512, 8 layers, GQA 8/2 heads, MLP 1376, vocabulary 32000, fp32, batch 1"
TARGET = "stream-bp step time <= 1.0x gradient checkpointing's at T = 4k-16k"
TARGET_LENGTHS = (4096, 16384)
N_CHUNKS = 4
STREAM = f"stream-bp/{N_CHUNKS}"


def llama(T: int):
    import transformers as tr

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tr.LlamaForCausalLM(tr.LlamaConfig(**CONFIG, max_position_embeddings=T, use_cache=False,
                                                   attn_implementation="sdpa"))
    return model.train()


def stream_bp_at(rev: str):
    """``StreamBP`` as the stream-bp package was at git revision ``rev`` (extracted to a
    temporary folder and imported beside the current one, as
    ``gradrewrite.passes.stream_bp_at_rev``)."""
    import io

    import gradrewrite.passes as passes

    try:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "gradrewrite/passes/stream_bp"],
                             capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as exc:
        print(f"error: --baseline {rev}: {exc.stderr.decode().strip()}; pass a git revision of this "
              "repository that has gradrewrite/passes/stream_bp", file=sys.stderr)
        sys.exit(2)
    folder = Path(tempfile.mkdtemp(prefix="streambp_rev_"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(folder, filter="data")
    pkg = folder / "stream_bp_at_rev"
    (folder / "gradrewrite" / "passes" / "stream_bp").rename(pkg)
    (pkg / "__init__.py").write_text("")  # the modules only: the pass is registered by the current one
    passes.__path__.append(str(folder))
    return importlib.import_module("gradrewrite.passes.stream_bp_at_rev.api").StreamBP


def step_fn(method: str, T: int, ids: torch.Tensor, baseline=None):
    model = llama(T)
    if method.startswith("stream-bp"):
        cls = baseline if "@" in method else StreamBP
        sbp = cls(model, n_chunks=int(method.split("/")[1].split("@")[0]))
        sbp.plan(ids)

        def step():
            model.zero_grad(set_to_none=True)
            sbp.backward(ids)
        return step
    if method == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def step():
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model(input_ids=ids).logits, ids).backward()
    return step


def measure(T: int, steps: dict, rounds: int) -> dict:
    """Round-robin timing of ``steps`` (method -> callable, "checkpoint" among them)."""
    for fn in steps.values():  # warm-up (and first-call allocations)
        fn()
    wall: dict[str, list[float]] = {m: [] for m in steps}
    cpu: dict[str, list[float]] = {m: [] for m in steps}
    for r in range(rounds):
        for m, fn in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[m].append(time.process_time() - c0)
            wall[m].append(time.perf_counter() - w0)
        print(f"  T={T} round {r + 1}/{rounds}: " + ", ".join(f"{m} {cpu[m][-1]:.2f}s" for m in steps), flush=True)
    ref = "checkpoint"
    out = {}
    for m in steps:
        out[m] = {"wall_s": statistics.median(wall[m]), "cpu_s": statistics.median(cpu[m]),
                  "wall_runs": wall[m], "cpu_runs": cpu[m]}
        for k, runs in (("wall", wall), ("cpu", cpu)):
            out[m][f"{k}_vs_checkpoint"] = statistics.median(a / b for a, b in zip(runs[m], runs[ref]))
    return out


def run_length(T: int, rounds: int, plain_max: int, baseline=None, rev: str | None = None) -> dict:
    ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(0))
    methods = (["plain"] if T <= plain_max else []) + ["checkpoint", STREAM] + ([f"{STREAM}@{rev}"] if rev else [])
    steps = {m: step_fn(m, T, ids, baseline) for m in methods}
    t0 = time.time()
    res = measure(T, steps, rounds)
    if rev:
        base = res[f"{STREAM}@{rev}"]
        for k in ("cpu", "wall"):
            res[STREAM][f"{k}_vs_baseline"] = statistics.median(
                a / b for a, b in zip(res[STREAM][f"{k}_runs"], base[f"{k}_runs"]))
    load = _loadavg()
    return {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rounds": rounds,
            "load_average_1min_after": load, "seconds": round(time.time() - t0, 1), "methods": res}


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _published() -> dict:
    """Rows of the published results measured on this model (kept when not rerun)."""
    path = _report.RESULTS / "streambp_speed.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("model") != MODEL:
        return {}
    return data.get("results", {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T = 1024, one round (results/tmp)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384], metavar="T")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up (default 2)")
    ap.add_argument("--plain-max", type=int, default=8192,
                    help="longest T that also times plain backprop (default 8192)")
    ap.add_argument("--baseline", metavar="REV", help="also time stream-bp as of this git revision, "
                    "in the same rounds (a paired before/after)")
    args = ap.parse_args()
    _report.need_plots()
    lengths, rounds = ([1024], 1) if args.quick else (args.lengths, args.rounds)
    if rounds < 1 or any(T < 2 * N_CHUNKS for T in lengths):
        print(f"error: need --rounds >= 1 and every T >= {2 * N_CHUNKS}; got rounds={rounds}, "
              f"lengths={lengths}", file=sys.stderr)
        sys.exit(2)
    baseline = stream_bp_at(args.baseline) if args.baseline else None
    rev = None
    if args.baseline:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
                             capture_output=True, text=True, check=True).stdout.strip()
    torch.set_num_threads(1)
    t_start = time.time()
    results = {} if args.quick else _published()
    for T in lengths:
        results[str(T)] = run_length(T, rounds, args.plain_max, baseline, rev)
        r = results[str(T)]["methods"]
        print(T, {m: (round(v["cpu_s"], 2), round(v["cpu_vs_checkpoint"], 3)) for m, v in r.items()}, flush=True)
        if rev:
            print(f"T={T}: {STREAM} over {STREAM}@{rev}, paired: CPU {r[STREAM]['cpu_vs_baseline']:.3f}x, "
                  f"wall {r[STREAM]['wall_vs_baseline']:.3f}x", flush=True)
    results = dict(sorted(results.items(), key=lambda kv: int(kv[0])))
    holds = {T: r["methods"][STREAM]["cpu_vs_checkpoint"] <= 1.0 for T, r in results.items()
             if TARGET_LENGTHS[0] <= int(T) <= TARGET_LENGTHS[1]}
    for T, ok in holds.items():
        print(f"target at T={T}: {'holds' if ok else 'missed'} "
              f"({results[T]['methods'][STREAM]['cpu_vs_checkpoint']:.3f}x checkpointing's CPU time)")
    rows = [[int(T), m, round(v["cpu_s"], 2), f"{v['cpu_vs_checkpoint']:.3f}", round(v["wall_s"], 2),
             f"{v['wall_vs_checkpoint']:.3f}", r["rounds"], r["load_average_1min_after"], r["generated"][:16]]
            for T, r in results.items() for m, v in r["methods"].items()]
    text = (f"{MODEL}, one torch thread, methods interleaved round by round in one process after "
            "a warm-up step each; CPU and wall time are medians over the rounds, the ratios to "
            "checkpointing are paired round by round (median of the per-round ratios). CPU time is "
            "the process's (what the step computed); wall time includes other jobs on the shared "
            "machine (load = 1-minute load average at the end of that length's run). Target ("
            + TARGET + "), on CPU time: "
            + (", ".join(f"T={T} {'holds' if ok else 'missed'}" for T, ok in holds.items()) or "no length run")
            + ". Lengths not listed were not run with this model."
            + "".join(f" At T={T}, {STREAM} over {m} (stream-bp as of that revision, timed in the same "
                      f"rounds): CPU {r['methods'][STREAM]['cpu_vs_baseline']:.3f}x, wall "
                      f"{r['methods'][STREAM]['wall_vs_baseline']:.3f}x (paired)."
                      for T, r in results.items() for m in r["methods"] if "@" in m))
    image = _plot(results, args.quick)
    _report.publish("streambp_speed", {
        "title": "StreamBP step time vs gradient checkpointing (vocabulary 32000)",
        "quick": args.quick, "model": MODEL, "config": CONFIG, "threads": 1,
        "results": results, "target": TARGET, "holds": holds,
        "runtime_seconds": round(time.time() - t_start, 1),
        "sections": [{"heading": "Step time", "text": text,
                      "columns": ["T", "method", "CPU s", "CPU vs checkpoint", "wall s", "wall vs checkpoint",
                                  "rounds", "load", "measured (UTC)"],
                      "rows": rows, "image": image}]}, quick=args.quick)


def _plot(results: dict, quick: bool) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.2))
    lengths = list(results)
    order = ["plain", "checkpoint", STREAM]
    methods = sorted({m for r in results.values() for m in r["methods"]},
                     key=lambda m: (order.index(m) if m in order else len(order), m))
    x = np.arange(len(lengths))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax.bar(x + (i - (len(methods) - 1) / 2) * width,
               [results[T]["methods"].get(m, {}).get("cpu_vs_checkpoint", np.nan) for T in lengths], width, label=m)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, [f"T={T}" for T in lengths])
    ax.set_ylabel("step CPU time / checkpointing's")
    ax.set_title("StreamBP vs checkpointing, d=512 x 8 layers, vocab 32000 (1 thread)", fontsize=9)
    ax.legend(fontsize=8)
    return _report.save_png(fig, "tmp/streambp_speed_quick" if quick else "streambp_speed")


if __name__ == "__main__":
    main()
