"""Quantized ops the graph may hold, shared by the quantize passes and the backends.

Static int8 graphs use PyTorch's own ``quantized_decomposed`` ops (registered by
importing ``torch.ao.quantization.fx._decomposed``, done here so every consumer of a
quantized graph has them).

Weight-only low-bit graphs use one custom op, ``gradrewrite::groupwise_linear``::

    groupwise_linear(x, packed, scales, zeros, bias?, outlier_values?, outlier_cols?,
                     outlier_rowptr?, bits, group, in_features) -> y

- ``packed``: uint8 ``[N, n_groups, group*bits/8]``: each group's ``bits``-bit codes
  as a little-endian bit stream (code ``i`` in bits ``i*bits .. i*bits+bits-1``; for
  4 bits the low nibble holds the even element). This is the layout of ONNX Runtime's
  ``com.microsoft.MatMulNBits`` ``B`` input. ``K = in_features`` is padded to
  ``n_groups * group`` with code = zero point.
- ``scales``: fp16 ``[N, n_groups]``; ``zeros``: uint8 ``[N, ceil(n_groups*bits/8)]``,
  each row's zero points as the same kind of bit stream (MatMulNBits' layout).
  ``W[n, k] = (code - zero) * scale`` for the group of ``k``.
- Outliers (all three or none): a CSR matrix ``[N, K]`` of fp16 ``outlier_values``,
  int32 ``outlier_cols`` and int32 ``outlier_rowptr`` (``N + 1``). Their positions hold
  the zero point in ``packed`` (so they dequantize to exactly 0) and the sparse term
  adds them back: ``y = x @ (W_q + S)^T + bias``.
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
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., L]`` integer codes below ``2**bits`` -> uint8 ``[..., ceil(L*bits/8)]``."""
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1).flatten(-2)  # LSB first
    pad = (-stream.shape[-1]) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.unflatten(-1, (-1, 8))
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 ``[..., B]`` -> int32 codes ``[..., length]``."""
    stream = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    stream = stream.flatten(-2)[..., : length * bits].unflatten(-1, (length, bits))
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(-1)


def dequantize_groupwise(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         bits: int, group: int, in_features: int) -> torch.Tensor:
    """The fp32 ``[N, K]`` weight the packed codes stand for (outlier slots are 0)."""
    n, n_groups, _ = packed.shape
    codes = unpack_bits(packed, bits, group)                        # [N, G, group]
    zp = unpack_bits(zeros, bits, n_groups)                          # [N, G]
    w = (codes - zp.unsqueeze(-1)).to(torch.float32) * scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(n, n_groups * group)[:, :in_features]


def csr_to_dense(values: torch.Tensor, cols: torch.Tensor, rowptr: torch.Tensor,
                 shape: tuple[int, int]) -> torch.Tensor:
    """CSR (values, int32 cols, int32 rowptr) -> a dense fp32 matrix."""
    counts = (rowptr[1:] - rowptr[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(shape[0]), counts)
    dense = torch.zeros(shape, dtype=torch.float32)
    dense[rows, cols.to(torch.int64)] = values.to(torch.float32)
    return dense


def groupwise_weight(packed, scales, zeros, outlier_values, outlier_cols, outlier_rowptr,
                     bits: int, group: int, in_features: int) -> torch.Tensor:
    """Dequantized weight plus the fp16 outliers, as fp32 ``[N, K]``."""
    w = dequantize_groupwise(packed, scales, zeros, bits, group, in_features)
    if outlier_values is not None and outlier_values.numel():
        w = w + csr_to_dense(outlier_values, outlier_cols, outlier_rowptr, tuple(w.shape))
    return w


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("gradrewrite::groupwise_linear", mutates_args=())
def groupwise_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, bias: Optional[torch.Tensor],
                     outlier_values: Optional[torch.Tensor], outlier_cols: Optional[torch.Tensor],
                     outlier_rowptr: Optional[torch.Tensor], bits: int, group: int,
                     in_features: int) -> torch.Tensor:
    """``linear(x, W_q + S, bias)`` with W_q group-wise low-bit, S fp16 CSR outliers."""
    w = groupwise_weight(packed, scales, zeros, outlier_values, outlier_cols, outlier_rowptr,
                         bits, group, in_features)
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


@groupwise_linear.register_fake
def _groupwise_linear_fake(x, packed, scales, zeros, bias, outlier_values, outlier_cols,
                           outlier_rowptr, bits, group, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


GROUPWISE_LINEAR = torch.ops.gradrewrite.groupwise_linear.default

__all__ = ["QUANTIZE_PER_TENSOR", "DEQUANTIZE_PER_TENSOR", "DEQUANTIZE_PER_CHANNEL",
           "GROUPWISE_LINEAR", "pack_bits", "unpack_bits", "dequantize_groupwise",
           "csr_to_dense", "groupwise_weight", "groupwise_linear"]
