"""Compressed N:M storage: the kept values plus a packed bitstream of their positions.

An N:M-sparse weight keeps n of every m weights along its reduction dimension, so it
can be stored as n values and n small indices per group instead of m values. This
module packs a (masked) weight into that form and back; it is what deployment
backends (the microcontroller C generator first) consume.

Grouping
--------
The grouping is the contract of ``nm_masks.py``: the weight is viewed as ``[rows, K]``
with the reduction dimension last (``masks.to_groups``):

- linear ``W[out, in]``: ``rows = out``, ``K = in``; row r is output feature r.
- conv ``W[out, in/groups, *k]``: the weight is permuted to ``[out, *k, in/groups]``
  and flattened to ``rows = out * prod(k)``, ``K = in/groups``; row
  ``r = ((o * kh) + y) * kw + x`` for a 2-D kernel (row-major over ``(o, *k)``), i.e.
  the K order of an NHWC implicit GEMM.

Each row is cut into ``G = ceil(K / m)`` groups of m consecutive elements. When K is
not a multiple of m (``pad``), the last group of every row is a short group of
``tail = K - (G - 1) * m`` real elements followed by ``m - tail`` padding slots that
are always zero and never stored as real data.

Byte layout of a ``PackedNM``
-----------------------------
Three flat arrays, each in row-major order ``row -> group -> slot``:

``values``  ``rows * G * n`` entries, shape ``[rows, G, n]``. Slot s of group g of
            row r holds the weight at position ``indices[r, g, s]`` of that group.
            Element type per ``value_dtype``: ``fp32`` IEEE binary32, ``fp16`` IEEE
            binary16, ``int8`` two's complement; multi-byte types are little-endian.
            A group with fewer than n kept weights (a short tail group, or a group
            whose mask keeps fewer than n) fills its remaining slots with value 0.

``indices`` a bitstream of ``rows * G * n`` indices, ``b = index_bits(m) =
            ceil(log2 m)`` bits each, in the same order as ``values``: index number
            ``i = (r * G + g) * n + s`` occupies stream bits ``[i*b, (i+1)*b)``.
            Stream bit j lives in byte ``j // 8`` at bit ``j % 8`` (bit 0 = least
            significant), and an index's least significant bit comes first. So for
            2:4 (b = 2) byte 0 holds indices 0..3 in bits 0-1, 2-3, 4-5, 6-7. The
            stream is not padded per row; its last byte is zero-filled. Length:
            ``ceil(rows * G * n * b / 8)`` bytes. Within a group the n indices are
            distinct and strictly increasing; fill slots use the lowest positions not
            kept (in a tail group these may be padding positions ``>= tail``, which a
            decoder drops).

``scales``  ``int8`` only: ``rows`` float32 (little-endian) per-row scales,
            symmetric: ``w ~= q * scale[r]``, ``scale = max|w_row| / 127`` (1.0 for
            an all-zero row), ``q`` rounded to nearest and clamped to [-127, 127].

Decoding a group: ``dense[r, g*m + indices[r,g,s]] = values[r,g,s] (* scale[r])`` for
each slot s (positions ``>= K`` are dropped), every other position is zero; then
``masks.from_groups`` restores the weight's own shape.

Size (``packed_bytes``) = values + ceil(index bits / 8) + scales, which per weight is
``bits_per_weight(n, m, value_bits, scale_bits_per_row=32 if int8, row_len=K)`` for an
unpadded weight (up to the last index byte).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .nm_masks import check_ratio, from_groups, index_bits, nm_mask, to_groups

VALUE_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "fp32": (torch.float32, 32),
    "fp16": (torch.float16, 16),
    "int8": (torch.int8, 8),
}
SCALE_BITS = 32  # one float32 scale per row for int8 values


@dataclass
class PackedNM:
    """One weight in compressed N:M form (see the module docstring for the layout)."""

    values: torch.Tensor            # [rows, groups, n] in the value dtype
    indices: torch.Tensor           # 1-D uint8 bitstream, index_bits(m) bits per index
    scales: torch.Tensor | None     # [rows] float32 when value_dtype == "int8"
    shape: tuple[int, ...]          # the dense weight's shape
    n: int
    m: int
    kind: str                       # "linear" | "conv"
    value_dtype: str                # "fp32" | "fp16" | "int8"
    rows: int                       # rows of the [rows, K] grouped view
    k: int                          # K, the reduction length
    pad: int                        # padding slots in the last group of each row (0..m-1)

    @property
    def groups(self) -> int:
        return self.values.shape[1]

    @property
    def index_bits(self) -> int:
        return index_bits(self.m)

    def decode_indices(self) -> torch.Tensor:
        """The indices as an int64 ``[rows, groups, n]`` tensor."""
        count = self.rows * self.groups * self.n
        return _unpack_bits(self.indices, count, self.index_bits).reshape(
            self.rows, self.groups, self.n)


def pack_nm(w: torch.Tensor, n: int, m: int, kind: str, *, mask: torch.Tensor | None = None,
            value_dtype: str = "fp32") -> PackedNM:
    """Pack ``w`` (keeping the weights where ``mask`` is True) into N:M storage.

    ``mask`` defaults to ``nm_mask(|w|, n, m, kind, pad=True)``: for a weight that is
    already N:M sparse it keeps every nonzero; for a dense weight it prunes by
    magnitude. A given mask must keep at most n per group (``ValueError`` otherwise).
    K not a multiple of m is always allowed here: the tail group is padded.
    """
    check_ratio(n, m)
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"unknown value_dtype {value_dtype!r}; use one of {list(VALUE_DTYPES)}")
    w = w.detach()
    if mask is None:
        mask = nm_mask(w, n, m, kind, pad=True)
    if tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
    g_w = to_groups(w.float().cpu(), kind)
    g_mask = to_groups(mask.bool().cpu(), kind)
    rows, k = g_w.shape
    groups = -(-k // m)
    pad = groups * m - k
    if pad:
        g_w = torch.cat([g_w, torch.zeros(rows, pad)], dim=1)
        g_mask = torch.cat([g_mask, torch.zeros(rows, pad, dtype=torch.bool)], dim=1)
    g_w = g_w.reshape(rows, groups, m)
    g_mask = g_mask.reshape(rows, groups, m)
    kept = g_mask.sum(-1)
    if bool((kept > n).any()):
        r, g = (kept > n).nonzero()[0].tolist()
        raise ValueError(f"mask keeps {int(kept[r, g])} > n={n} weights in group {g} of row {r}; "
                         f"it is not {n}:{m}")
    # Kept positions first (ascending), then the lowest unkept positions as fill; the n
    # slots are then sorted ascending so indices are strictly increasing per group.
    pos = torch.arange(m).expand(rows, groups, m)
    key = torch.where(g_mask, pos, pos + m)
    slots = torch.sort(key, dim=-1).values[..., :n] % m
    slots = torch.sort(slots, dim=-1).values
    vals = torch.gather(g_w * g_mask, -1, slots)

    scales = None
    torch_dtype, _ = VALUE_DTYPES[value_dtype]
    if value_dtype == "int8":
        amax = vals.abs().amax(dim=(1, 2))
        scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).float()
        q = torch.round(vals / scales[:, None, None]).clamp(-127, 127)
        values = q.to(torch.int8)
    else:
        values = vals.to(torch_dtype)
    return PackedNM(values=values.contiguous(), indices=_pack_bits(slots.flatten(), index_bits(m)),
                    scales=scales, shape=tuple(w.shape), n=n, m=m, kind=kind,
                    value_dtype=value_dtype, rows=rows, k=k, pad=pad)


def unpack_nm(p: PackedNM) -> torch.Tensor:
    """The dense float32 weight (exact for fp32/fp16-representable values; int8 is
    within half a quantization step, ``scale/2``, of the packed weight)."""
    vals = p.values.float()
    if p.scales is not None:
        vals = vals * p.scales[:, None, None]
    idx = p.decode_indices()
    dense = torch.zeros(p.rows, p.groups, p.m).scatter_(-1, idx, vals)
    dense = dense.reshape(p.rows, p.groups * p.m)[:, : p.k]
    return from_groups(dense, torch.empty(p.shape, device="meta"), p.kind)


def packed_bytes(p: PackedNM) -> int:
    """Bytes of the three arrays as laid out in the module docstring."""
    count = p.rows * p.groups * p.n
    value_bits = VALUE_DTYPES[p.value_dtype][1]
    total = count * value_bits // 8 + math.ceil(count * p.index_bits / 8)
    if p.scales is not None:
        total += p.rows * SCALE_BITS // 8
    return total


def bits_per_weight(n: int, m: int, value_bits: int, *, scale_bits_per_row: int = 0,
                    row_len: int | None = None) -> float:
    """Storage bits per dense weight: ``(n*value_bits + n*index_bits(m)) / m``, plus
    ``scale_bits_per_row / row_len`` when rows carry a scale (int8)."""
    check_ratio(n, m)
    bits = (n * value_bits + n * index_bits(m)) / m
    if scale_bits_per_row:
        if not row_len:
            raise ValueError("row_len is needed to amortise a per-row scale")
        bits += scale_bits_per_row / row_len
    return bits


def layer_bits_per_weight(shape: tuple[int, ...], n: int, m: int, kind: str,
                          value_dtype: str) -> float:
    """Exact storage bits per dense weight of one layer, padded tail groups included
    (equals ``bits_per_weight`` when K is a multiple of m); no byte rounding."""
    like = torch.empty(shape, device="meta")
    rows, k = to_groups(like, kind).shape
    groups = -(-k // m)
    value_bits = VALUE_DTYPES[value_dtype][1]
    bits = rows * groups * n * (value_bits + index_bits(m))
    if value_dtype == "int8":
        bits += rows * SCALE_BITS
    return bits / (rows * k)


def _pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Little-endian bitstream of ``values`` (each < 2**bits), LSB first, as uint8."""
    v = values.to(torch.int64).flatten()
    stream = ((v[:, None] >> torch.arange(bits)) & 1).flatten()
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])
    weights = 1 << torch.arange(8)
    return (stream.reshape(-1, 8) * weights).sum(-1).to(torch.uint8)


def _unpack_bits(data: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    stream = ((data.to(torch.int64)[:, None] >> torch.arange(8)) & 1).flatten()[: count * bits]
    return (stream.reshape(count, bits) << torch.arange(bits)).sum(-1)


__all__ = ["PackedNM", "pack_nm", "unpack_nm", "packed_bytes", "bits_per_weight",
           "layer_bits_per_weight", "VALUE_DTYPES"]
