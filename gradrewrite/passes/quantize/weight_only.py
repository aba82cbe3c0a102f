"""Weight-only group-wise asymmetric low-bit quantization with fp16 sparse outliers."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...rewrite.graph import Graph, copy_meta, fake_like
from ...rewrite.quant_ops import GROUPWISE_LINEAR, ROW_BLOCK_ELEMENTS, groupwise_weight, pack_bits
from .layers import QLayer
from .outliers import store_outliers

BITS = (2, 3, 4, 8)


@dataclass
class GroupwiseWeight:
    packed: torch.Tensor     # uint8 [N, G, group*bits/8]
    scales: torch.Tensor     # fp16 [N, G]
    zeros: torch.Tensor      # uint8 [N, ceil(G*bits/8)]
    values: torch.Tensor     # fp16 [nnz], row-major (whole columns: [N, c])
    cols: torch.Tensor       # int16 [nnz] (col - 32768; int32 col when K > 65536); columns: [c]
    counts: torch.Tensor | None   # uint8 [N] outliers per row (int16 / int32 when a row holds
                                  # more); None for whole columns
    bits: int
    group: int
    in_features: int
    # gptq act_groups=ordered: everything above is stored for the input permuted by ``order``
    # (int16 [K]: stored column j reads input feature order[j]); None: the input as it is
    order: torch.Tensor | None = None
    order_bits: int = 0      # the order's bits where this layer stores it, 0 where it reuses a sibling's

    def dequantized(self) -> torch.Tensor:
        """fp32 [N, K] in the input's own feature order: low-bit weights with the outliers added back."""
        vals = self.values if self.values.numel() else None
        w = groupwise_weight(self.packed, self.scales, self.zeros, vals, self.cols, self.counts,
                             self.bits, self.group, self.in_features)
        if self.order is not None:
            w = w[:, torch.argsort(self.order.long())]
        return w

    def storage_bits(self) -> dict[str, int]:
        """Bits actually stored, by part (bias, if any, is not part of the weight): every
        tensor the graph holds, at its dtype's width (no outliers: none of the three)."""
        bits = lambda t: t.numel() * t.element_size() * 8
        stored = self.values.numel() > 0
        return {"codes": bits(self.packed), "scales": bits(self.scales),
                "zero_points": bits(self.zeros),
                "outlier_values": bits(self.values) if stored else 0,
                "outlier_cols": bits(self.cols) if stored else 0,
                "outlier_rows": bits(self.counts) if stored and self.counts is not None else 0,
                "input_order": self.order_bits}


def quantize_groupwise(w: torch.Tensor, bits: int, group: int,
                       outliers: torch.Tensor | None = None) -> GroupwiseWeight:
    """Asymmetric ``bits``-bit codes per group of ``group`` input features; entries in
    ``outliers`` (bool mask) are kept as fp16 CSR and left out of the group ranges."""
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, w.shape[1]))
    if outliers is None and w.shape[0] > rows:   # a large table: row blocks, bit-identical (all row-wise)
        parts = [_quantize_rows(w[i:i + rows], bits, group, None) for i in range(0, w.shape[0], rows)]
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])
        return GroupwiseWeight(cat("packed"), cat("scales"), cat("zeros"), cat("values"), cat("cols"),
                               cat("counts"), bits, group, w.shape[1])
    return _quantize_rows(w, bits, group, outliers)


def _quantize_rows(w: torch.Tensor, bits: int, group: int, outliers: torch.Tensor | None) -> GroupwiseWeight:
    w = w.detach().float()
    n, k = w.shape
    qmax = (1 << bits) - 1
    n_groups = math.ceil(k / group)
    pad = n_groups * group - k
    keep = outliers if outliers is not None else torch.zeros_like(w, dtype=torch.bool)
    wp = torch.nn.functional.pad(w, (0, pad)).reshape(n, n_groups, group)
    kp = torch.nn.functional.pad(keep, (0, pad)).reshape(n, n_groups, group)
    scale16, zero = group_params(wp, kp, bits)
    s = scale16.float()                                   # quantize with the stored scale
    codes = torch.clamp(torch.round(wp / s[..., None]) + zero[..., None], 0, qmax)
    codes = torch.where(kp, zero[..., None].expand_as(codes), codes)   # outliers dequantize to 0
    values, cols, counts = store_outliers(w, keep)
    return GroupwiseWeight(pack_bits(codes, bits), scale16, pack_bits(zero, bits),
                           values, cols, counts, bits, group, k)


def group_params(wg: torch.Tensor, keep: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and (float) zero point of each group ``wg[..., group]``, from the range of
    the entries not in ``keep`` (outliers), widened to contain 0 so the zero point is a code."""
    qmax = (1 << bits) - 1
    lo = torch.where(keep, torch.inf, wg).amin(-1).clamp(max=0)
    hi = torch.where(keep, -torch.inf, wg).amax(-1).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-7)
    # stored in fp16, rounded up (the step never shrinks, so codes stay within 0..qmax and
    # every weight is within half a step of its dequantized value)
    scale16 = (scale.float() * (1 + 2 ** -10)).to(torch.float16)
    zero = torch.clamp(torch.round(-lo.float() / scale16.float()), 0, qmax)
    return scale16, zero


def rtn_dequantized(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round-to-nearest (no outliers) and back: the fp32 weight RTN would leave."""
    return quantize_groupwise(w, bits, group).dequantized()


def permuted_input(graph: Graph, layer: QLayer, order: torch.Tensor, shared: dict) -> tuple[object, int]:
    """The layer's input with its features in ``order`` (``x[..., order]``: an index_select
    before the layer), and the bits this costs in storage. Layers that read the same input in
    the same order (q/k/v, gate/up: their Hessians are equal) share one stored order and one
    index_select: ``shared`` maps an input node to ``(order, permuted node)``."""
    x = layer.node.args[0]
    hit = shared.get(x)
    if hit is not None and torch.equal(hit[0], order):
        return hit[1], 0
    node = layer.node
    attr = graph.add_attr(f"{layer.param}_input_order", order, before=node, parameter=False)   # stored as given
    with graph.graph.inserting_before(node):
        index = graph.graph.call_function(torch.ops.aten._to_copy.default, (attr,), {"dtype": torch.int32})
        picked = graph.graph.call_function(torch.ops.aten.index_select.default, (x, -1, index))
    for new in (index, picked):
        copy_meta(node, new)
    index.meta["val"] = fake_like(order.to(torch.int32), node)
    if "val" in getattr(x, "meta", {}):
        picked.meta["val"] = x.meta["val"]    # same shape and dtype
    shared[x] = (order, picked)
    return picked, order.element_size() * 8 * order.numel()


def replace_linear(graph: Graph, layer: QLayer, q: GroupwiseWeight, x=None) -> None:
    """``linear(x, W, b)`` -> ``groupwise_linear(x, packed, scales, zeros, b, outliers…)``
    (``x``: the input node to read instead of the layer's own, e.g. ``permuted_input``'s)."""
    node = layer.node
    add = lambda suffix, value: graph.add_attr(f"{layer.param}_{suffix}", value, before=node,
                                               parameter=False)
    packed, scales, zeros = add("packed", q.packed), add("scales", q.scales), add("zeros", q.zeros)
    if q.values.numel():
        vals, cols = add("outlier_values", q.values), add("outlier_cols", q.cols)
        counts = add("outlier_counts", q.counts) if q.counts is not None else None
    else:
        vals = cols = counts = None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    with graph.graph.inserting_before(node):
        new = graph.graph.call_function(GROUPWISE_LINEAR, (
            node.args[0] if x is None else x, packed, scales, zeros, bias, vals, cols, counts, q.bits, q.group,
            q.in_features))
    copy_meta(node, new, keep_val=True)
    new.meta.setdefault("gradrewrite", {}).update(
        {"quantized": f"{q.bits}-bit g{q.group}", "outliers": int(q.values.numel())})
    node.replace_all_uses_with(new)
    graph.graph.erase_node(node)


__all__ = ["BITS", "GroupwiseWeight", "quantize_groupwise", "group_params", "rtn_dequantized", "replace_linear",
           "permuted_input"]
