"""Activation observers for static int8: min/max, percentile, MSE-optimal and entropy (KL) ranges.

Each observer sees every calibration batch of one tensor and turns what it saw into a
range ``(lo, hi)`` (always containing 0, so 0.0 is exact), then into per-tensor affine
int8 parameters ``scale, zero_point`` over [-128, 127].
"""
from __future__ import annotations

import math

import torch

QMIN, QMAX = -128, 127
OBSERVERS = ("minmax", "percentile", "mse", "entropy")
_BINS = 2048       # entropy observer: histogram bins over the observed range
_SAMPLE = 1 << 16   # values kept per batch by the sampling observers


class MinMax:
    def __init__(self) -> None:
        self.lo, self.hi = math.inf, -math.inf

    def update(self, t: torch.Tensor) -> None:
        t = t.detach().float()
        self.lo = min(self.lo, float(t.min()))
        self.hi = max(self.hi, float(t.max()))

    def range(self) -> tuple[float, float]:
        return self.lo, self.hi


class _Sampled:
    """Keeps a strided sample of every batch (deterministic), plus the exact extremes."""

    def __init__(self) -> None:
        self.samples: list[torch.Tensor] = []
        self.minmax = MinMax()

    def update(self, t: torch.Tensor) -> None:
        flat = t.detach().float().reshape(-1)
        self.minmax.update(flat)
        step = max(1, flat.numel() // _SAMPLE)
        self.samples.append(flat[::step].clone())

    def values(self) -> torch.Tensor:
        return torch.cat(self.samples)


class Percentile(_Sampled):
    def __init__(self, percentile: float = 99.99) -> None:
        super().__init__()
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        v = self.values()
        q = self.percentile / 100.0
        return float(torch.quantile(v, 1 - q)), float(torch.quantile(v, q))


class MSE(_Sampled):
    """The clipping range, shrunk from min/max, that minimises the int8 round-trip MSE."""

    def range(self) -> tuple[float, float]:
        v = self.values()
        lo, hi = self.minmax.range()
        best, best_err = (lo, hi), math.inf
        for frac in torch.linspace(0.3, 1.0, 36).tolist():
            c_lo, c_hi = lo * frac, hi * frac
            scale, zp = qparams(c_lo, c_hi)
            err = float(((fake_quant(v, scale, zp) - v) ** 2).mean())
            if err < best_err:
                best, best_err = (c_lo, c_hi), err
        return best


class Entropy(_Sampled):
    """TensorRT-style entropy calibration: the clipping range, shrunk from min/max by the
    factor that keeps the 255-step quantized histogram closest (KL divergence) to the
    observed one, values beyond the range counted at its edges."""

    def range(self) -> tuple[float, float]:
        v = self.values().double()
        lo, hi = min(self.minmax.range()[0], 0.0), max(self.minmax.range()[1], 0.0)
        if not hi > lo:
            return lo, hi
        hist = torch.histc(v, _BINS, lo, hi)
        edges = torch.linspace(lo, hi, _BINS + 1, dtype=torch.float64)
        best, best_kl = (lo, hi), math.inf
        for frac in torch.linspace(0.3, 1.0, 36).tolist():
            c_lo, c_hi = lo * frac, hi * frac
            a = int(torch.searchsorted(edges, torch.tensor(c_lo, dtype=torch.float64)).clamp(0, _BINS - 1))
            b = int(torch.searchsorted(edges, torch.tensor(c_hi, dtype=torch.float64), right=True).clamp(a + 1, _BINS))
            kl = _kl_clipped(hist, a, b, QMAX - QMIN)
            if kl < best_kl:
                best, best_kl = (c_lo, c_hi), kl
        return best


def _kl_clipped(hist: torch.Tensor, a: int, b: int, levels: int) -> float:
    """KL(P || Q) as TensorRT computes it: P = hist[a:b] with the mass outside added to its
    edge bins; Q = hist[a:b] without that mass, merged into ``levels`` equal groups of bins,
    each group's mass spread over its nonzero bins (so clipping costs what it moves)."""
    inside = hist[a:b]
    p = inside.clone()
    p[0] += hist[:a].sum()
    p[-1] += hist[b:].sum()
    n = p.numel()
    group = torch.div(torch.arange(n) * min(levels, n), n, rounding_mode="floor")
    mass = torch.zeros(min(levels, n), dtype=p.dtype).index_add_(0, group, inside)
    nonzero = torch.zeros(min(levels, n), dtype=p.dtype).index_add_(0, group, (inside > 0).to(p.dtype))
    q = torch.where(inside > 0, mass[group] / nonzero[group].clamp(min=1), torch.zeros_like(p))
    total_p, total_q = p.sum(), q.sum()
    if not total_p > 0:
        return 0.0
    p, q = p / total_p, q / total_q
    keep = p > 0
    q = q.clamp(min=1e-12)   # an edge bin that holds only clipped mass
    return float((p[keep] * (p[keep] / q[keep]).log()).sum())


def make_observer(kind: str, percentile: float):
    if kind == "minmax":
        return MinMax()
    if kind == "percentile":
        return Percentile(percentile)
    if kind == "mse":
        return MSE()
    if kind == "entropy":
        return Entropy()
    raise ValueError(kind)


def qparams(lo: float, hi: float) -> tuple[float, int]:
    """Per-tensor affine int8 scale and zero point for the range [lo, hi] (0 included)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (QMAX - QMIN)
    if not scale > 0 or not math.isfinite(scale):
        scale = 1.0
    scale = float(torch.tensor(scale, dtype=torch.float32))   # the value the graph will hold
    zp = int(round(QMIN - lo / scale))
    return scale, max(QMIN, min(QMAX, zp))


def fake_quant(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """quantize_per_tensor then dequantize_per_tensor, in plain torch."""
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zp, QMIN, QMAX)   # as quantized_decomposed
    return (q - zp) * scale


__all__ = ["OBSERVERS", "make_observer", "qparams", "fake_quant", "QMIN", "QMAX"]
