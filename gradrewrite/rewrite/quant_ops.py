"""Quantized ops the graph may hold, shared by the quantize passes and the backends.

Static int8 graphs use PyTorch's own ``quantized_decomposed`` ops (registered by
importing ``torch.ao.quantization.fx._decomposed``, done here so every consumer of a
quantized graph has them).

Weight-only low-bit graphs use one custom op, ``gradrewrite::groupwise_linear``::

    groupwise_linear(x, packed, scales, zeros, bias?, outlier_values?, outlier_cols?,
                     outlier_counts?, bits, group, in_features) -> y

- ``packed``: uint8 ``[N, n_groups, group*bits/8]``: each group's ``bits``-bit codes
  as a little-endian bit stream (code ``i`` in bits ``i*bits .. i*bits+bits-1``; for
  4 bits the low nibble holds the even element). This is the layout of ONNX Runtime's
  ``com.microsoft.MatMulNBits`` ``B`` input. ``K = in_features`` is padded to
  ``n_groups * group`` with code = zero point.
- ``scales``: fp16 ``[N, n_groups]``; ``zeros``: uint8 ``[N, ceil(n_groups*bits/8)]``,
  each row's zero points as the same kind of bit stream (MatMulNBits' layout).
  ``W[n, k] = (code - zero) * scale`` for the group of ``k``.
- Outliers (all three or none): a compressed-row matrix ``S [N, K]`` stored in the
  narrowest integers that hold it: fp16 ``outlier_values [nnz]`` in row-major order;
  ``outlier_cols [nnz]``: int16 holding ``col - 32768`` when ``K <= 65536`` (so 16 bits
  reach every column), else int32 holding ``col``; ``outlier_counts [N]``: each row's
  number of outliers as uint8 when every row has at most 255, else int16 (at most
  32767), else int32. Their positions hold the zero point in ``packed`` (so they
  dequantize to exactly 0) and the sparse term adds them back:
  ``y = x @ (W_q + S)^T + bias``.
- Whole-column outliers (``quantize(spread=cols)``: every row holds the same ``c``
  columns) are stored without row counts: ``outlier_values`` fp16 ``[N, c]`` (2-D: that
  rank marks the form), ``outlier_cols [c]`` as above, ``outlier_counts`` None. 16 bits
  per outlier, and the decode term is a gather of ``c`` inputs and a small dense matmul.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

quantized_decomposed = torch.ops.quantized_decomposed

QUANTIZE_PER_TENSOR = quantized_decomposed.quantize_per_tensor.default
DEQUANTIZE_PER_TENSOR = quantized_decomposed.dequantize_per_tensor.default
DEQUANTIZE_PER_CHANNEL = quantized_decomposed.dequantize_per_channel.default


# ----------------------------------------------------------------------------- bit streams
# Row blocks of this many elements bound the temporaries of packing and unpacking a large
# weight (an LLM's embedding table) to a few times one block; every step is row-wise, so
# blocked results are bit-identical to whole-tensor ones.
ROW_BLOCK_ELEMENTS = 1 << 22


def _row_block(rows: int, per_row: int) -> int:
    return max(1, ROW_BLOCK_ELEMENTS // max(1, per_row)) if rows * per_row > ROW_BLOCK_ELEMENTS else rows


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., L]`` integer codes below ``2**bits`` -> uint8 ``[..., ceil(L*bits/8)]``."""
    if codes.dim() > 1:
        flat = codes.reshape(-1, codes.shape[-1])
        block = _row_block(flat.shape[0], flat.shape[1])
        if block < flat.shape[0]:
            parts = [_pack_bits(flat[i:i + block], bits) for i in range(0, flat.shape[0], block)]
            return torch.cat(parts).reshape(*codes.shape[:-1], -1)
    return _pack_bits(codes, bits)


def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits in (2, 4, 8):      # codes never straddle a byte: or-in each code slot's shift
        per = 8 // bits
        pad = (-codes.shape[-1]) % per
        c = codes.to(torch.uint8)
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        c = c.unflatten(-1, (-1, per))
        out = c[..., 0].clone()
        for j in range(1, per):
            out |= c[..., j] << (j * bits)
        return out
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1).flatten(-2)  # LSB first
    pad = (-stream.shape[-1]) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.unflatten(-1, (-1, 8))
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 ``[..., B]`` -> int32 codes ``[..., length]``."""
    if bits in (2, 4, 8):      # codes never straddle a byte: shift/mask per code, not per bit
        per = 8 // bits
        wide = packed.to(torch.int32).unsqueeze(-1) >> (torch.arange(per, dtype=torch.int32) * bits)
        return (wide & ((1 << bits) - 1)).flatten(-2)[..., :length]
    stream = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    stream = stream.flatten(-2)[..., : length * bits].unflatten(-1, (length, bits))
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(-1)


def dequantize_groupwise(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         bits: int, group: int, in_features: int) -> torch.Tensor:
    """The fp32 ``[N, K]`` weight the packed codes stand for (outlier slots are 0)."""
    n, n_groups, _ = packed.shape
    block = _row_block(n, n_groups * group)
    if block < n:  # a large weight: row blocks into one output (bounded temporaries)
        out = torch.empty((n, in_features), dtype=torch.float32)
        for i in range(0, n, block):
            out[i:i + block] = _dequantize_rows(packed[i:i + block], scales[i:i + block], zeros[i:i + block],
                                                bits, group, in_features)
        return out
    return _dequantize_rows(packed, scales, zeros, bits, group, in_features)


def _dequantize_rows(packed, scales, zeros, bits: int, group: int, in_features: int) -> torch.Tensor:
    n, n_groups, _ = packed.shape
    codes = unpack_bits(packed, bits, group)                        # [N, G, group]
    zp = unpack_bits(zeros, bits, n_groups)                          # [N, G]
    w = (codes - zp.unsqueeze(-1)).to(torch.float32) * scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(n, n_groups * group)[:, :in_features]


COL_OFFSET = 32768     # int16 column indices hold col - COL_OFFSET: 16 bits reach K = 65536


def pack_outlier_positions(rows: torch.Tensor, cols: torch.Tensor, n_rows: int,
                           in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major ``(rows, cols)`` -> the stored ``(cols, counts)`` in their narrowest dtypes."""
    if in_features <= 2 * COL_OFFSET:
        cols = (cols.to(torch.int32) - COL_OFFSET).to(torch.int16)
    else:
        cols = cols.to(torch.int32)
    counts = torch.bincount(rows.to(torch.int64), minlength=n_rows)
    top = int(counts.max()) if counts.numel() else 0
    dtype = torch.uint8 if top <= 255 else torch.int16 if top <= 32767 else torch.int32
    return cols, counts.to(dtype)


def outlier_positions(cols: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored ``(cols, counts)`` -> int64 ``(rows, cols)`` of every outlier."""
    rows = torch.repeat_interleave(torch.arange(counts.numel()), counts.to(torch.int64))
    return rows, stored_columns(cols)


def stored_columns(cols: torch.Tensor) -> torch.Tensor:
    """Stored outlier columns (int16 ``col - COL_OFFSET`` or int32 ``col``) -> int64 columns."""
    return cols.to(torch.int64) + (COL_OFFSET if cols.dtype == torch.int16 else 0)


def outliers_to_dense(values: torch.Tensor, cols: torch.Tensor, counts: Optional[torch.Tensor],
                      shape: tuple[int, int]) -> torch.Tensor:
    """Stored outliers (values, cols, counts; or whole columns: 2-D values) -> dense fp32."""
    dense = torch.zeros(shape, dtype=torch.float32)
    if values.dim() == 2:
        dense[:, stored_columns(cols)] = values.to(torch.float32)
        return dense
    rows, cols = outlier_positions(cols, counts)
    dense[rows, cols] = values.to(torch.float32)
    return dense


def groupwise_weight(packed, scales, zeros, outlier_values, outlier_cols, outlier_counts,
                     bits: int, group: int, in_features: int) -> torch.Tensor:
    """Dequantized weight plus the fp16 outliers, as fp32 ``[N, K]``."""
    w = dequantize_groupwise(packed, scales, zeros, bits, group, in_features)
    if outlier_values is not None and outlier_values.numel():
        w = w + outliers_to_dense(outlier_values, outlier_cols, outlier_counts, tuple(w.shape))
    return w


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("gradrewrite::groupwise_linear", mutates_args=())
def groupwise_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, bias: Optional[torch.Tensor],
                     outlier_values: Optional[torch.Tensor], outlier_cols: Optional[torch.Tensor],
                     outlier_counts: Optional[torch.Tensor], bits: int, group: int,
                     in_features: int) -> torch.Tensor:
    """``linear(x, W_q + S, bias)`` with W_q group-wise low-bit, S fp16 sparse outliers."""
    w = groupwise_weight(packed, scales, zeros, outlier_values, outlier_cols, outlier_counts,
                         bits, group, in_features)
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


@groupwise_linear.register_fake
def _groupwise_linear_fake(x, packed, scales, zeros, bias, outlier_values, outlier_cols,
                           outlier_counts, bits, group, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


GROUPWISE_LINEAR = torch.ops.gradrewrite.groupwise_linear.default

__all__ = ["QUANTIZE_PER_TENSOR", "DEQUANTIZE_PER_TENSOR", "DEQUANTIZE_PER_CHANNEL",
           "GROUPWISE_LINEAR", "pack_bits", "unpack_bits", "dequantize_groupwise",
           "COL_OFFSET", "pack_outlier_positions", "outlier_positions", "stored_columns", "outliers_to_dense",
           "groupwise_weight", "groupwise_linear"]
