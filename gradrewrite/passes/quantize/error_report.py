"""Per-layer error report: each quantized layer's output against the float layer's,
on the same recorded inputs (calibration data, else seeded random inputs)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch


def layer_error(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Relative L2 error, max abs error and SQNR (dB) over (float, quantized) outputs."""
    err2 = ref2 = 0.0
    max_abs = 0.0
    for ref, got in pairs:
        d = (got.double() - ref.double())
        err2 += float((d * d).sum())
        ref2 += float((ref.double() ** 2).sum())
        max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
    rel = math.sqrt(err2 / ref2) if ref2 > 0 else math.sqrt(err2)
    sqnr = 10 * math.log10(ref2 / err2) if err2 > 0 and ref2 > 0 else math.inf
    return {"relative_error": round(rel, 6), "max_abs_error": round(max_abs, 6),
            "sqnr_db": round(sqnr, 2) if math.isfinite(sqnr) else None}


def render_table(rows: Iterable[dict[str, Any]], title: str = "per-layer quantization error") -> str:
    """The error report as a plain-text table (``gradrewrite inspect`` prints it)."""
    rows = list(rows)
    head = ["layer", "kind", "shape", "bits/weight", "outliers", "rel. error", "max abs", "SQNR dB"]
    body = [[r["path"], r.get("kind", ""), "x".join(map(str, r.get("shape", []))),
             f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") is not None else "",
             str(r.get("outliers", "")), f"{r['relative_error']:.3g}", f"{r['max_abs_error']:.3g}",
             "inf" if r.get("sqnr_db") is None else f"{r['sqnr_db']:.1f}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    lines = [title, fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    return "\n".join(lines)


def error_tables(pass_reports: Iterable[dict[str, Any]]) -> list[str]:
    """Rendered tables for every pass report that carries an ``error_report``."""
    out = []
    for rec in pass_reports:
        report = rec.get("report", {})
        rows = report.get("error_report")
        if rows:
            data = report.get("error_data", "")
            out.append(render_table(rows, f"{rec.get('name', 'quantize')}: per-layer output error "
                                          f"vs the float layer ({data})"))
    return out


__all__ = ["layer_error", "render_table", "error_tables"]
