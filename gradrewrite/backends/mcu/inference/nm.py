"""N:M sparse weights in flash: detect the pattern from the weight's zeros, pack it.

After ``nm-sparsity`` (+ ``nm-finalize``) a layer's weight is masked dense. We find
the (n, m) whose packed form is smallest (values + position bitstream, the layout of
``rewrite/nm_storage.py``, whose ``pack_nm`` we reuse as the format's single
definition) and keep it only when it saves at least a fifth of the dense bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ....rewrite.nm_storage import pack_nm

CANDIDATE_M = (4, 8, 16)
MIN_SAVING = 0.8   # packed must be <= 80% of dense bytes


@dataclass
class NMWeight:
    n: int
    m: int
    bits: int
    groups: int
    k: int
    values: np.ndarray    # flat, in the weight's dtype
    indices: np.ndarray   # uint8 bitstream plus one zero byte of padding

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes


def _grouped(w: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "linear":
        return w.reshape(w.shape[0], -1)
    return w.permute(0, *range(2, w.dim()), 1).reshape(-1, w.shape[1])


def detect(w: torch.Tensor, kind: str) -> NMWeight | None:
    """Packed N:M form of ``w`` (fp32 or int8), or None when it does not pay off."""
    if w.dim() < 2 or w.numel() < 64:
        return None
    g = _grouped(w, kind) != 0
    rows, k = g.shape
    dense_bytes = w.numel() * w.element_size()
    best = None
    for m in CANDIDATE_M:
        if k < m:
            continue
        pad = (-k) % m
        gp = torch.cat([g, torch.zeros(rows, pad, dtype=torch.bool)], 1) if pad else g
        n = int(gp.reshape(rows, -1, m).sum(-1).max())
        if n == 0 or n >= m:
            continue
        slots = rows * (gp.shape[1] // m) * n
        bits = max(1, math.ceil(math.log2(m)))
        size = slots * w.element_size() + math.ceil(slots * bits / 8) + 1
        if size <= MIN_SAVING * dense_bytes and (best is None or size < best[0]):
            best = (size, n, m)
    if best is None:
        return None
    _, n, m = best
    p = pack_nm(w.float(), n, m, kind, mask=w != 0, value_dtype="fp32")
    values = p.values.flatten().numpy()
    values = values.astype(np.int8) if w.dtype == torch.int8 else values.astype(np.float32)
    indices = np.concatenate([p.indices.numpy().astype(np.uint8), np.zeros(1, np.uint8)])
    return NMWeight(n, m, p.index_bits, p.groups, p.k, values, indices)
