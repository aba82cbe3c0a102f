"""``gradrewrite::groupwise_embedding``: an embedding lookup into a low-bit table.

::

    groupwise_embedding(indices, packed, scales, zeros, bits, group, dim) -> [*indices.shape, dim]

The table ``[V, dim]`` is stored exactly like a ``groupwise_linear`` weight ``[N=V,
K=dim]`` (``quant_ops``): ``packed`` uint8 ``[V, G, group*bits/8]`` bit streams (``dim``
padded to ``G * group`` with code = zero point), ``scales`` fp16 ``[V, G]``, ``zeros``
uint8 ``[V, ceil(G*bits/8)]``. Groups run along the embedding dim, so one row is a
whole number of groups: a lookup dequantizes only the rows it gathers, and a tied LM
head can read the very same buffers through ``groupwise_linear`` (weight ``[V, dim]``).
Output is fp32 (the tables this op replaces are fp32).
"""
from __future__ import annotations

import torch

from .quant_ops import dequantize_groupwise


@torch.library.custom_op("gradrewrite::groupwise_embedding", mutates_args=())
def groupwise_embedding(indices: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """``embedding(W_q, indices)``, dequantizing the gathered rows only."""
    flat = indices.reshape(-1).long()
    rows = dequantize_groupwise(packed[flat], scales[flat], zeros[flat], bits, group, dim)
    return rows.reshape(*indices.shape, dim)


@groupwise_embedding.register_fake
def _groupwise_embedding_fake(indices, packed, scales, zeros, bits, group, dim):
    return indices.new_empty((*indices.shape, dim), dtype=torch.float32)


GROUPWISE_EMBEDDING = torch.ops.gradrewrite.groupwise_embedding.default

__all__ = ["GROUPWISE_EMBEDDING", "groupwise_embedding"]
