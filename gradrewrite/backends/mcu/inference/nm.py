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


# ---- packed forms of an int8 N:M pointwise conv for ``gr_pointwise_nm_s8`` (the format
# comment in kernels/gr_int8.c): GR_PW_NM1 below a quarter density, GR_PW_NM24 for 2:4
PW_NM1, PW_NM24 = 1, 2
NM24_PAIRS = ((0, 1), (2, 3), (0, 2), (1, 3), (0, 3), (1, 2))


PW_DENSE = 0
# 2:4 pairs take about 13 instructions per group of four channels and output channel
# against the dense kernel's 16, but their gather costs about 38 more per group (shared by
# every output channel): below this many output channels the dense kernel is cheaper
NM24_MIN_OC = 16


def pointwise_format(p: NMWeight, oc: int) -> int | None:
    """The ``gr_pointwise_nm_s8`` format for an int8 [oc, cin] 1x1 weight packed as ``p``:
    PW_DENSE when the dense kernel is cheaper, None when no pointwise format pays (the
    generic ``gr_conv2d_nm_s8`` runs it)."""
    if (p.n, p.m) == (2, 4):
        return PW_NM24 if oc >= NM24_MIN_OC else PW_DENSE
    return PW_NM1 if p.n * 4 <= p.m else None


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def pointwise_entries(w: np.ndarray, fmt: int) -> tuple[np.ndarray, int]:
    """([oc, count] int32 entries, count) of int8 weight ``w`` [oc, cin] in format ``fmt``."""
    oc, cin = w.shape
    w = w.astype(np.int64)
    if fmt == PW_NM1:  # (weight as int16) | (8 * channel) << 16, nonzeros only, zero-padded
        nz = w != 0
        count = max(1, int(nz.sum(1).max(initial=0)))
        out = np.zeros((oc, count), np.int64)
        for o in range(oc):
            cols = np.flatnonzero(nz[o])
            out[o, :len(cols)] = (w[o, cols] & 0xFFFF) | (cols * 8) << 16
        return out.astype(np.uint32).view(np.int32), count
    groups = count = -(-cin // 4)
    wp = np.zeros((oc, count * 4), np.int64)
    wp[:, :cin] = w
    g4 = wp.reshape(oc, count, 4)
    out = np.zeros((oc, count), np.int64)
    index = {pair: k for k, pair in enumerate(NM24_PAIRS)}
    for o in range(oc):
        for g in range(groups):
            kept = [i for i in range(4) if g4[o, g, i] != 0]
            if len(kept) > 2:
                raise ValueError("not 2:4")
            a, b = (kept + [i for i in range(4) if i not in kept])[:2]
            a, b = min(a, b), max(a, b)
            k = index[(a, b)]
            out[o, g] = (g4[o, g, a] & 0xFF) | (6 * (g % 4) + k) << 8 | (g4[o, g, b] & 0xFF) << 16
    return out.astype(np.uint32).view(np.int32), count


def pointwise_scratch_words(fmt: int, cin: int) -> int:
    """int32 words of the gather scratch ``gr_pointwise_nm_s8`` / ``gr_pw_dw_s8`` need."""
    if fmt == PW_NM1:
        return 2 * cin
    if fmt == PW_NM24:
        return 24 * -(-cin // 4)
    return 2 * _round_up(cin, 4)
