"""Activation observers for static int8: min/max, percentile and MSE-optimal ranges.

Each observer sees every calibration batch of one tensor and turns what it saw into a
range ``(lo, hi)`` (always containing 0, so 0.0 is exact), then into per-tensor affine
int8 parameters ``scale, zero_point`` over [-128, 127].
"""
from __future__ import annotations

import math

import torch

QMIN, QMAX = -128, 127
OBSERVERS = ("minmax", "percentile", "mse")
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


def make_observer(kind: str, percentile: float):
    if kind == "minmax":
        return MinMax()
    if kind == "percentile":
        return Percentile(percentile)
    if kind == "mse":
        return MSE()
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
