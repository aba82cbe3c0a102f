"""Shared benchmark plumbing: machine facts, timing, JSON + PNG output, BENCHMARKS.md.

Every benchmark script writes ``benchmarks/results/<name>.json`` (and PNGs next to it)
and then calls ``regenerate()``, which rebuilds BENCHMARKS.md from every JSON file in
``results/``. Numbers in BENCHMARKS.md therefore always come from a script run.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ORDER = ["backends"]  # sections first in this order, the rest alphabetically


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for pkg in ("torch", "onnxruntime", "onnx", "apache-tvm"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return info


def _summaries(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: {"median_ms": statistics.median(v), "p10_ms": sorted(v)[len(v) // 10],
                "p90_ms": sorted(v)[(9 * len(v)) // 10], "runs": len(v)} for k, v in samples.items()}


def interleaved_medians(fns: dict[str, Callable[[], Any]], *, runs: int = 50,
                        warmup: int = 5) -> dict[str, dict[str, float]]:
    """Time several callables round-robin so machine noise hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return _summaries(samples)


def blocked_medians(fns: dict[str, Callable[[], Any]], *, blocks: int = 15, per_block: int = 20,
                    warmup: int = 5, pause_s: float = 0.05) -> dict[str, dict[str, float]]:
    """Time several callables round-robin by blocks: each block runs one callable
    ``warmup + per_block`` times back to back (as a decode loop runs one model token after
    token, its weights warm in cache) and times the last ``per_block``. The pause before a
    block lets the previous callable's idle threads stop spinning on the cores."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            time.sleep(pause_s)
            for _ in range(warmup):
                fn()
            for _ in range(per_block):
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    out = _summaries(samples)
    for k, v in samples.items():   # one median per block, for ratios paired block by block
        out[k]["block_medians_ms"] = [statistics.median(v[i:i + per_block]) for i in range(0, len(v), per_block)]
    return out


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median over blocks of ``a``'s block median / ``b``'s (``blocked_medians`` results):
    each ratio compares two blocks timed moments apart, so a machine that slows down or
    speeds up during the run (other jobs, a VM's neighbours) moves both sides of it."""
    return statistics.median(x / y for x, y in zip(a["block_medians_ms"], b["block_medians_ms"]))


def write(name: str, data: dict[str, Any], *, folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"name": name, "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), **data}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


QUICK = RESULTS / "tmp"   # gitignored: smoke runs land here


def publish(name: str, data: dict[str, Any], *, quick: bool = False) -> Path:
    """Write a run's results and rebuild BENCHMARKS.md; a ``--quick`` smoke run goes to
    results/tmp/<name>_quick.json instead and never replaces the published numbers."""
    if quick:
        path = write(f"{name}_quick", data, folder=QUICK)
        print(f"quick run: wrote {path}; BENCHMARKS.md untouched")
        return path
    write(name, data)
    path = regenerate()
    print(f"wrote {path}")
    return path


def need_plots() -> None:
    """Fail before the measuring, not after it: the plots need matplotlib (the bench extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from gradrewrite.errors import InputError
        raise InputError("this benchmark plots its results and matplotlib is not installed",
                         'pip install -e ".[bench]"') from None


def save_png(fig, name: str, quick: bool = False) -> str:
    """Save a matplotlib figure as results/<name>.png and close it; returns the file name
    (relative to results/). A smoke run's (``quick``) goes to results/tmp/<name>_quick.png."""
    import matplotlib.pyplot as plt

    folder = QUICK if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    path = folder / (f"{name}_quick.png" if quick else f"{name}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path.relative_to(RESULTS))


def latency_bars(records: list[dict], kinds: list[str], labels: list[str], path: Path, *, title: str,
                 figsize: tuple[float, float], tick_fontsize: float | None = None,
                 hatch: Callable[[str], str | None] = lambda kind: None) -> str:
    """Grouped bars, log scale: one group per record, one bar per kind, from
    ``record["latency"][kind]["median_ms"]`` (a gap where a record lacks the kind).
    Writes ``path`` and returns its file name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=figsize)
    width = 0.8 / max(1, len(kinds))
    x = np.arange(len(records))
    for i, kind in enumerate(kinds):
        vals = [r["latency"][kind]["median_ms"] if kind in r["latency"] else np.nan for r in records]
        ax.bar(x + (i - (len(kinds) - 1) / 2) * width, vals, width, label=kind, hatch=hatch(kind))
    ax.set_xticks(x, labels, fontsize=tick_fontsize)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (median, log scale)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def md_table(columns: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def regenerate() -> Path:
    """Rebuild BENCHMARKS.md from every results/*.json (each carries its own sections)."""
    results = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    names = [n for n in ORDER if n in results] + sorted(n for n in results if n not in ORDER)
    out = ["# Benchmarks", "",
           "Generated by the scripts in `benchmarks/` — do not edit by hand; rerun a script "
           "(e.g. `python benchmarks/backends.py`) to refresh its section. Timings are medians "
           "of interleaved runs on a shared, noisy 2-core machine: compare ratios within one "
           "table, not across tables.", ""]
    for name in names:
        data = results[name]
        m = data.get("machine", {})
        out += [f"## {data.get('title', name)}", "",
                f"`benchmarks/{name}.py`, {data['generated']}; {m.get('cpu', '?')}, "
                f"{m.get('cpu_count', '?')} cores, torch {m.get('torch', '?')}, "
                f"onnxruntime {m.get('onnxruntime', '?')}.", ""]
        for section in data.get("sections", []):
            if section.get("heading"):
                out += [f"### {section['heading']}", ""]
            if section.get("text"):
                out += [section["text"], ""]
            if section.get("columns"):
                out += [md_table(section["columns"], section["rows"]), ""]
            if section.get("image"):
                out += [f"![{section.get('heading', name)}](benchmarks/results/{section['image']})", ""]
    path = ROOT / "BENCHMARKS.md"
    path.write_text("\n".join(out).rstrip() + "\n")
    return path
