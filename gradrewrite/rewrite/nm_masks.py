"""N:M masks: keep the n largest-scoring weights in every group of m.

Groups run along the reduction dimension, in the order a kernel reads it:
- linear ``W[out, in]``: m consecutive input features of one output row;
- conv ``W[out, in/groups, kh, kw]``: m consecutive *input channels* at one kernel
  position (the K order of an NHWC implicit GEMM, what sparse tensor cores and the
  microcontroller kernels consume), i.e. the weight viewed as ``[out, kh, kw, in]``.

``to_groups``/``from_groups`` convert between a weight and its ``[rows, K]`` grouped
view, so every user of the grouping (masks, training rules, compressed storage) agrees.
"""
from __future__ import annotations

import math

import torch

KINDS = ("linear", "conv")


class NMShapeError(ValueError):
    """The reduction dimension is not a multiple of m (the caller pads or skips)."""


def check_ratio(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or m < 2 or not 0 < n < m:
        raise ValueError(f"need 0 < n < m and m >= 2, got {n}:{m}")


def to_groups(w: torch.Tensor, kind: str) -> torch.Tensor:
    """``[rows, K]`` view with the grouped (reduction) dimension last and contiguous."""
    if kind == "linear":
        if w.dim() != 2:
            raise ValueError(f"linear weight must be 2-D, got {tuple(w.shape)}")
        return w
    if kind == "conv":
        if w.dim() < 3:
            raise ValueError(f"conv weight must be at least 3-D, got {tuple(w.shape)}")
        perm = (0, *range(2, w.dim()), 1)            # [O, I, *k] -> [O, *k, I]
        return w.permute(perm).reshape(-1, w.shape[1])
    raise ValueError(f"unknown weight kind {kind!r}; use one of {KINDS}")


def from_groups(g: torch.Tensor, like: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of ``to_groups`` for a tensor shaped like ``like``."""
    if kind == "linear":
        return g.reshape(like.shape)
    o, i, *k = like.shape
    inv = (0, like.dim() - 1, *range(1, like.dim() - 1))   # [O, *k, I] -> [O, I, *k]
    return g.reshape(o, *k, i).permute(inv).contiguous()


def reduction_size(w_shape: tuple[int, ...], kind: str) -> int:
    """Length of the grouped dimension (K): ``in`` for linear, ``in/groups`` for conv."""
    return int(w_shape[1])


def nm_mask(w: torch.Tensor, n: int, m: int, kind: str, *, score: torch.Tensor | None = None,
            pad: bool = False) -> torch.Tensor:
    """Boolean mask with exactly n True in every group of m along the reduction dim.

    ``score`` defaults to ``|w|``. Ties go to the lower index (stable), so masks are
    deterministic. If K is not a multiple of m: ``pad=False`` raises ``NMShapeError``;
    ``pad=True`` treats the tail as a short group padded with zero-score slots, so
    the tail keeps ``min(n, tail)`` weights.
    """
    check_ratio(n, m)
    s = (w if score is None else score).detach().abs().float()
    g = to_groups(s, kind)
    rows, k = g.shape
    if k % m:
        if not pad:
            raise NMShapeError(f"reduction dimension {k} is not a multiple of m={m}")
        g = torch.cat([g, torch.full((rows, m - k % m), -1.0, device=g.device)], dim=1)  # padding never wins
    groups = g.reshape(rows, -1, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    keep = keep.reshape(rows, -1)[:, :k]
    return from_groups(keep, w, kind)


def check_nm(mask: torch.Tensor, n: int, m: int, kind: str) -> bool:
    """True when every full group of m holds at most n kept weights (exactly n when
    the group has at least n entries), the invariant every mask here satisfies."""
    g = to_groups(mask, kind)
    k = g.shape[1]
    full = g[:, : k - k % m].reshape(g.shape[0], -1, m).sum(-1)
    ok = bool((full == n).all())
    if k % m:
        ok = ok and bool((g[:, k - k % m:].sum(-1) == min(n, k % m)).all())
    return ok


def index_bits(m: int) -> int:
    """Bits to address one position in a group of m."""
    return max(1, math.ceil(math.log2(m)))
