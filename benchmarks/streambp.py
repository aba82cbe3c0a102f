"""StreamBP: peak memory of plain backprop, gradient checkpointing and stream-bp (issue 20).

Model: Llama-like (transformers LlamaForCausalLM), d=512, 8 layers, GQA 8/2 heads, SwiGLU
1376, vocabulary 32000 (and one configuration with Llama 3's 128256), fp32, CPU, batch 1,
random weights (same seed for every method). One training step = forward + next-token
loss + backward into ``.grad``:

- plain: ``loss.backward()``;
- checkpoint: HF ``gradient_checkpointing_enable`` (non-reentrant);
- stream-bp: ``StreamBP(model, chunk=1024).backward(ids)`` (1024 rows per backward and
  LM-head chunk).

Every (vocabulary, method, T) runs in its own fresh ``python`` process, one step, which
reports (one torch thread):

- peak RSS of the step (``VmHWM`` reset after the model is built, so it is the whole
  process's peak during the step: runtime + weights + what the step adds);
- peak live tensor bytes during the step (``gradrewrite.rewrite.live_bytes.LiveBytes``,
  deterministic; parameters, allocated before, excluded);
- the gradients, compared with plain's where plain ran at that T (max over parameters of
  ||g - g_plain|| / ||g_plain||).

Parts (``--parts``, comma-separated; results are merged into ``results/streambp.json``,
so parts can run in separate sittings):

- ``memory``: the grid T in ``--lengths`` (default 2k, 4k, 8k) for every method, vocab 32000;
- ``longest``: per method, T doubled from 2k until the fresh process's peak RSS exceeds
  ``--cap-mib`` (4096) — measured, not extrapolated — or until the next step is projected
  (x3 per doubling) past ``--step-budget-s``: then "≥ T, not reached" with the reason;
- ``vocab128k``: the grid at T in ``--lengths-128k`` (default 2k, 4k), vocabulary 128256.

Step time is measured by ``benchmarks/streambp_speed.py`` (interleaved, CPU time); its
results are quoted here when present.

    python benchmarks/streambp.py --parts memory,vocab128k
    python benchmarks/streambp.py --parts longest --step-budget-s 900
    python benchmarks/streambp.py --estimate --parts memory,longest   # runtime estimate only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _report  # noqa: E402
from gradrewrite.errors import InputError  # noqa: E402

MiB = 2 ** 20
METHODS = ["plain", "checkpoint", "stream-bp"]
CHUNK = 1024
VOCABS = {"32k": 32000, "128k": 128256}
PARTS = ("memory", "longest", "vocab128k")
TARGET_LONGEST = "stream-bp's longest T under 4 GiB >= 8x checkpointing's at vocabulary 32000"
ANCHOR = "StreamBP paper: 2.8-5.5x the sequence length of gradient checkpointing at comparable time"
# seconds of one fresh process at T=2048, vocabulary 32000 (imports, build, capture and the
# step, one thread) under load 5-9 on the shared 2-core machine: the runtime estimate's
# base when no earlier result exists
DEFAULT_STEP_S = {"plain": 150.0, "checkpoint": 155.0, "stream-bp": 185.0}


def build(vocab: int, T: int, method: str):
    """(model, step function) for one method; the same seed gives the same weights."""
    import transformers as tr

    from gradrewrite.passes.stream_bp import StreamBP, causal_lm_loss

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tr.LlamaForCausalLM(tr.LlamaConfig(
            vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=T,
            use_cache=False, attn_implementation="sdpa"))
    model.train()
    ids = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(1))
    if method == "stream-bp":
        sbp = StreamBP(model, chunk=CHUNK)
        sbp.plan(ids)   # capture once, before the measured step

        def step():
            sbp.backward(ids)
        return model, step
    if method == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def step():
        causal_lm_loss(model(input_ids=ids).logits, ids).backward()
    return model, step


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(vocab: int, T: int, method: str, grads_to: str | None) -> None:
    """One step in this (fresh) process; prints one JSON line."""
    from gradrewrite.rewrite.live_bytes import LiveBytes

    torch.set_num_threads(1)
    model, step = build(vocab, T, method)
    Path("/proc/self/clear_refs").write_text("5")   # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    w0, c0 = time.perf_counter(), time.process_time()
    with LiveBytes() as mode:   # weakref finalisers only: holds no tensor alive
        step()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    peak = _status_kib("VmHWM")
    if grads_to:
        torch.save({n: p.grad for n, p in model.named_parameters()}, grads_to)
    print(json.dumps({"rss_peak_mib": peak / 1024, "rss_before_step_mib": base / 1024,
                      "peak_live_mib": mode.peak / MiB, "step_wall_s": wall, "step_cpu_s": cpu}))


def measure(vocab: int, T: int, method: str, grads_to: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(vocab), str(T), method] + (["--grads-to", grads_to] if grads_to else [])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"failed": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}",
                "process_s": time.perf_counter() - t0}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - t0
    return row


def grad_error(ref_path: str, path: str) -> float:
    ref, got = torch.load(ref_path, weights_only=True), torch.load(path, weights_only=True)
    return max(float((got[n] - g).norm() / g.norm().clamp(min=1e-30)) for n, g in ref.items())


class Store:
    """results/streambp.json's measurements, keyed vocab -> method -> T, merged across runs."""

    def __init__(self):
        path = _report.RESULTS / "streambp.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        self.rows: dict = old.get("measurements", {}) if old.get("config") == config() else {}
        self.longest: dict = old.get("longest", {}) if self.rows else {}

    def get(self, vk: str, method: str, T: int) -> dict | None:
        return self.rows.get(vk, {}).get(method, {}).get(str(T))

    def put(self, vk: str, method: str, T: int, row: dict) -> None:
        self.rows.setdefault(vk, {}).setdefault(method, {})[str(T)] = row


def config() -> dict:
    return {"hidden": 512, "layers": 8, "heads": "8/2", "mlp": 1376, "dtype": "float32",
            "batch": 1, "threads": 1, "stream_bp_chunk": CHUNK}


def run_grid(store: Store, vk: str, lengths: list[int], budget: float, log) -> None:
    """Every method at every T (plain first: the others' gradients are compared with it)."""
    vocab = VOCABS[vk]
    with tempfile.TemporaryDirectory() as tmp:
        for T in lengths:
            ref = None
            for method in METHODS:
                prev = store.get(vk, method, T // 2)
                if prev and "step_wall_s" in prev and prev["step_wall_s"] * 3 > budget:
                    log(f"{vk} {method} T={T}: skipped (T={T // 2} took {prev['step_wall_s']:.0f} s)")
                    continue
                path = os.path.join(tmp, f"{method}.pt")
                row = measure(vocab, T, method, path)
                if method == "plain" and "failed" not in row:
                    ref = path
                elif ref and "failed" not in row:
                    row["grad_rel_err_vs_plain"] = grad_error(ref, path)
                    os.unlink(path)
                store.put(vk, method, T, row)
                log(f"{vk} {method} T={T}: {_fmt(row)}")


def run_longest(store: Store, cap_mib: float, budget: float, log, methods: list[str] = METHODS) -> None:
    """Per method, double T from 2k until the fresh process's peak RSS exceeds the cap."""
    for method in methods:
        T, best, reason = 2048, None, None
        while True:
            row = store.get("32k", method, T)
            if row is None:
                prev = store.get("32k", method, T // 2)
                if prev and prev.get("step_wall_s", 0) * 3 > budget:
                    reason = (f"T={T} not run: the step at T={T // 2} took {prev['step_wall_s']:.0f} s, "
                              f"projected x3 past the {budget:.0f} s step budget")
                    break
                row = measure(VOCABS["32k"], T, method)
                store.put("32k", method, T, row)
                log(f"32k {method} T={T}: {_fmt(row)}")
            if "failed" in row:
                reason = f"T={T} failed: {row['failed']}"
                break
            if row["rss_peak_mib"] > cap_mib:
                break
            best = T
            T *= 2
        store.longest[method] = {"max_T_under_cap": best, "first_T_over_cap": None if reason else T,
                                 "not_reached": reason}
        log(f"longest {method}: {store.longest[method]}")


def _fmt(row: dict) -> str:
    if "failed" in row:
        return "failed: " + row["failed"]
    err = f", grad err {row['grad_rel_err_vs_plain']:.1e}" if "grad_rel_err_vs_plain" in row else ""
    return (f"RSS {row['rss_peak_mib']:.0f} MiB, live {row['peak_live_mib']:.0f} MiB, "
            f"step {row['step_wall_s']:.0f} s wall / {row['step_cpu_s']:.0f} s CPU{err}")


def estimate(store: Store, parts: list[str], lengths: list[int], lengths_128k: list[int],
             longest_methods: list[str]) -> float:
    """Seconds: each missing (method, T) at its fresh process's time at T=2048 (measured, or
    a default for load ~5) x2.5 per doubling of T (the 128k vocabulary: x2 the base); the
    longest part counted up to T=8192."""
    def secs(vk: str, method: str, T: int) -> float:
        if store.get(vk, method, T):
            return 0.0
        base = DEFAULT_STEP_S[method] * (2 if vk == "128k" else 1)
        done = store.get(vk, method, 2048)
        if done and "process_s" in done:
            base = done["process_s"]
        return base * 2.5 ** max(0, (T // 2048).bit_length() - 1)
    total = 0.0
    if "memory" in parts:
        total += sum(secs("32k", m, T) for m in METHODS for T in lengths)
    if "vocab128k" in parts:
        total += sum(secs("128k", m, T) for m in METHODS for T in lengths_128k)
    if "longest" in parts:
        total += sum(secs("32k", m, T) for m in longest_methods for T in (2048, 4096, 8192)
                     if not ("memory" in parts and T in lengths))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="memory,vocab128k", help=f"comma-separated: {', '.join(PARTS)}")
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--lengths-128k", default="2048,4096")
    ap.add_argument("--cap-mib", type=float, default=4096.0)
    ap.add_argument("--step-budget-s", type=float, default=600.0,
                    help="do not start a step projected (x3 per doubling of T) to take longer than this")
    ap.add_argument("--longest-methods", default=",".join(METHODS),
                    help="the methods the longest part runs (the others keep their stored result)")
    ap.add_argument("--estimate", action="store_true", help="print the runtime estimate and exit")
    ap.add_argument("--child", nargs=3, metavar=("VOCAB", "T", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--grads-to", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), int(args.child[1]), args.child[2], args.grads_to)
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    try:
        lengths = [int(t) for t in args.lengths.split(",")]
        lengths_128k = [int(t) for t in args.lengths_128k.split(",")]
    except ValueError:
        raise InputError(f"streambp: --lengths {args.lengths!r} / --lengths-128k {args.lengths_128k!r}",
                         "give comma-separated integers, e.g. --lengths 2048,4096") from None
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise InputError(f"streambp: unknown part(s) {', '.join(bad) or '(none given)'}",
                         f"choose from {', '.join(PARTS)}")
    store = Store()
    longest_methods = [m for m in METHODS if m in args.longest_methods.split(",")]
    est = estimate(store, parts, lengths, lengths_128k, longest_methods)
    print(f"estimated runtime: {est / 60:.0f} min (under load 5-9 on 2 cores; measurements "
          "already stored are not rerun)", flush=True)
    if args.estimate:
        return
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)
    if "memory" in parts:
        run_grid(store, "32k", lengths, args.step_budget_s, log)
        publish(store, args.cap_mib, time.time() - t_start)   # each part's results kept as it ends
    if "vocab128k" in parts:
        run_grid(store, "128k", lengths_128k, args.step_budget_s, log)
        publish(store, args.cap_mib, time.time() - t_start)
    if "longest" in parts:
        run_longest(store, args.cap_mib, args.step_budget_s, log, longest_methods)
        publish(store, args.cap_mib, time.time() - t_start)


def publish(store: Store, cap_mib: float, seconds: float) -> None:
    longest = store.longest
    holds = None
    if "checkpoint" in longest and "stream-bp" in longest:
        ck, sb = longest["checkpoint"], longest["stream-bp"]
        if ck["max_T_under_cap"] and sb["max_T_under_cap"]:
            ratio = sb["max_T_under_cap"] / ck["max_T_under_cap"]
            holds = True if ratio >= 8 else (None if sb["not_reached"] else False)
    verdict = {True: "holds", False: "missed", None: "not decided (stream-bp's longest T was not reached)"}[holds]
    if longest:
        print(f"target ({TARGET_LONGEST}): {verdict}", flush=True)
    sections = _sections(store, cap_mib, verdict)
    _report.publish("streambp", {
        "title": "StreamBP: peak memory of backprop, checkpointing and stream-bp (issue 20)",
        "config": config(), "methods": METHODS, "vocabularies": VOCABS, "cap_mib": cap_mib,
        "measurements": store.rows, "longest": longest, "target_longest": TARGET_LONGEST,
        "target_longest_holds": holds, "anchor": ANCHOR, "last_runtime_seconds": round(seconds, 1),
        "load_average_end": os.getloadavg()[0], "sections": sections})


def _sections(store: Store, cap_mib: float, verdict: str) -> list[dict]:
    text = ("Llama-like d=512, 8 layers, GQA 8/2 heads, SwiGLU 1376, fp32, CPU, batch 1, one torch "
            "thread; one training step (forward, next-token loss, backward into .grad) per fresh "
            "process. Peak RSS is the process's high-water mark during the step (runtime, weights "
            "and gradients included); peak live MiB counts the tensor storage the step creates "
            "(parameters excluded); gradient error is the largest ||g - g_plain|| / ||g_plain|| over "
            f"parameters. stream-bp runs {CHUNK}-row chunks. Measured on a shared 2-core machine "
            "(memory does not depend on the load; the step seconds shown are a single wall-clock "
            "step under load, not a timing comparison).")
    sections = [{"text": text}]
    for vk, vocab in VOCABS.items():
        by_method = store.rows.get(vk)
        if not by_method:
            continue
        Ts = sorted({int(T) for m in by_method.values() for T in m})
        rows = []
        for T in Ts:
            ck = store.get(vk, "checkpoint", T)
            for method in METHODS:
                r = store.get(vk, method, T)
                if r is None:
                    continue
                if "failed" in r:
                    rows.append([T, method, "failed", "", "", "", "", r["failed"][:60]])
                    continue
                vs = (f"{r['peak_live_mib'] / ck['peak_live_mib']:.2f}"
                      if ck and "peak_live_mib" in ck else "")
                err = f"{r['grad_rel_err_vs_plain']:.1e}" if "grad_rel_err_vs_plain" in r else ""
                rows.append([T, method, round(r["rss_peak_mib"]), round(r["rss_peak_mib"] - r["rss_before_step_mib"]),
                             round(r["peak_live_mib"]), vs, round(r["step_wall_s"]), err])
        sections.append({"heading": f"Vocabulary {vocab}: peak memory per step",
                         "columns": ["T", "method", "peak RSS MiB", "step adds RSS MiB", "peak live MiB",
                                     "live vs checkpoint", "step s (wall, loaded)", "grad err vs plain"],
                         "rows": rows})
    if store.longest:
        rows = []
        for method, r in store.longest.items():
            if r["not_reached"]:
                got = f">= {r['max_T_under_cap']}, not reached" if r["max_T_under_cap"] else "none"
            else:
                got = r["max_T_under_cap"] or f"none (T=2048 is over)"
            rows.append([method, got, r["first_T_over_cap"] or "", r["not_reached"] or ""])
        sections.append({
            "heading": f"Longest T under {cap_mib / 1024:g} GiB of peak RSS (vocabulary 32000, measured)",
            "text": (f"T doubled from 2048 per method until a fresh process's peak RSS exceeded "
                     f"{cap_mib:.0f} MiB; a step projected past the step budget is not started and the "
                     f"row says so. Target ({TARGET_LONGEST}): {verdict}. {ANCHOR}."),
            "columns": ["method", "longest T under the cap", "first T over the cap", "why not reached"],
            "rows": rows})
    speed = _report.RESULTS / "streambp_speed.json"
    if speed.exists():
        sp = json.loads(speed.read_text())
        sections.append({"heading": "Step time",
                         "text": (f"Measured by `benchmarks/streambp_speed.py` ({sp['generated']}; see its "
                                  f"section): target ({sp['target']}): "
                                  + ", ".join(f"T={T} {'holds' if ok else 'missed'}" for T, ok in sp["holds"].items())
                                  + ".")})
    sections.append({"heading": "Peak memory against sequence length", "image": _plot(store, cap_mib)})
    return sections


def _plot(store: Store, cap_mib: float) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for vk, ls in (("32k", "-"), ("128k", ":")):
        for i, method in enumerate(METHODS):
            pts = sorted((int(T), r) for T, r in store.rows.get(vk, {}).get(method, {}).items() if "failed" not in r)
            if not pts:
                continue
            for ax, key in zip(axes, ("rss_peak_mib", "peak_live_mib")):
                ax.plot([T for T, _ in pts], [r[key] for _, r in pts], marker="o", ls=ls, color=f"C{i}",
                        label=f"{method}, vocab {VOCABS[vk]}")
    axes[0].axhline(cap_mib, color="k", lw=0.8, ls="--")
    for ax, title in zip(axes, ("peak RSS of a fresh process (MiB)", "peak live tensor MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    return _report.save_png(fig, "streambp")


def cli(main_fn) -> None:
    """Run a benchmark's main; bad arguments print one line and exit 2."""
    try:
        main_fn()
    except InputError as exc:
        print(exc.one_line(), file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    cli(main)
