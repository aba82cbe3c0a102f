"""One outlier term per shared input, for batch-1 decode on ONNX Runtime.

At one input row, ``groupwise_linear``'s fp16 outliers run beside ``MatMulNBits`` as a
small term fed to its bias input (see ``ort_quant``). Two things made that term costly:

- **Skewed rows.** GWQ's outliers (``spread=layer``) crowd into a few output rows: on the
  benchmark LM a 1536-row layer has 5 outliers per row on average and 500 in its fullest
  row, so rows padded to the longest gathered the whole matrix (24 ms per token against
  2 ms for RTN). Here rows are cut into chunks of a width chosen from the stored counts
  (empty rows get none) and the chunk sums are scattered back to their rows.
- **Several small terms per input.** q/k/v (and gate/up) read the same input; each had
  its own 3-5 small ops, and at batch 1 their dispatch is what the term costs. Layers that
  share an input now share one term: one gather, one product, one reduction (and one
  scatter) for the group, split into each layer's bias.

``fuse(graph)`` rewrites a *view* of the graph (same tensors, new FX graph) for export:
each such group becomes one ``gradrewrite_ort::outlier_terms`` node whose output is split
into the members' biases; members keep their codes and lose their outlier arguments. The
ONNX translation builds the chunked layout at session load from the stored form (the file
is unchanged: values fp16, 16-bit columns, 8-bit counts), so only a width per group is
decided here, from the counts.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch import fx

from ..rewrite.graph import Graph
from ..rewrite.quant_ops import GROUPWISE_LINEAR, outliers_to_dense

# relative per-call costs used to pick a group's chunk width: one gathered element, one
# reduced row, and the scatter op's fixed cost (its dispatch), in gathered-element units
ELEMENT, ROW, SCATTER = 1.0, 2.0, 1500.0


@torch.library.custom_op("gradrewrite_ort::outlier_terms", mutates_args=())
def outlier_terms(x: torch.Tensor, values: list[torch.Tensor], cols: list[torch.Tensor],
                  counts: list[Optional[torch.Tensor]], biases: list[Optional[torch.Tensor]],
                  out_features: list[int], in_features: int, width: int) -> torch.Tensor:
    """``concat_i(S_i @ x + b_i)`` for one input row ``x``: the outlier terms (and biases)
    of the layers that read ``x``, concatenated. ``width`` only shapes the ONNX form."""
    row = x.reshape(-1, in_features)[0].to(torch.float32)
    parts = []
    for v, c, n, b, nf in zip(values, cols, counts, biases, out_features):
        t = outliers_to_dense(v, c, n, (nf, in_features)) @ row
        parts.append(t if b is None else t + b.to(torch.float32))
    return torch.cat(parts).to(x.dtype)


@outlier_terms.register_fake
def _outlier_terms_fake(x, values, cols, counts, biases, out_features, in_features, width):
    return x.new_empty((sum(out_features),))


OUTLIER_TERMS = torch.ops.gradrewrite_ort.outlier_terms.default


# ----------------------------------------------------------------------------- planning
def chunk_width(counts: list[torch.Tensor]) -> int:
    """The chunk width for a group's rows (0: no chunks, every row padded to the group's
    longest, no scatter), minimising the modelled per-call cost."""
    c = torch.cat([t.to(torch.int64).reshape(-1) for t in counts])
    longest = int(c.max()) if c.numel() else 0
    if longest == 0:
        return 0
    best_w, best = 0, ELEMENT * c.numel() * longest + ROW * c.numel()
    nonzero = c[c > 0]
    candidates = sorted({int(v) for v in torch.unique(nonzero)} | {2 ** i for i in range(int(math.log2(longest)) + 1)})
    for w in candidates:
        chunks = (nonzero + w - 1) // w
        cost = ELEMENT * float((chunks * w).sum()) + ROW * float(chunks.sum()) + SCATTER
        if cost < best:
            best_w, best = w, cost
    return best_w


def one_row(node: fx.Node) -> bool:
    """Whether ``node``'s value has one row (all dimensions but the last are 1, static)."""
    val = node.meta.get("val")
    if val is None:
        return False
    try:
        return math.prod(int(d) for d in val.shape[:-1]) == 1
    except (TypeError, ValueError):
        return False                                   # a symbolic (dynamic) dimension


def _groups(graph: Graph) -> dict[tuple, list[fx.Node]]:
    groups: dict[tuple, list[fx.Node]] = {}
    for node in graph.call_nodes():
        if node.target is not GROUPWISE_LINEAR:
            continue
        x, values, bits = node.args[0], node.args[5], node.args[8]
        if values is None or bits == 8 or not one_row(x):
            continue
        v = graph.attr(values)
        if v.numel():
            groups.setdefault((x, v.dim()), []).append(node)   # whole columns (2-D) and rows apart
    return groups


# ----------------------------------------------------------------------------- rewrite
def view_of(graph: Graph) -> tuple[fx.GraphModule, dict]:
    """A new GraphModule over ``graph.gm``'s tensors with a copy of its FX graph, and the
    map from the original nodes to their copies: a rewrite for one backend leaves the
    graph as it is."""
    new_graph, copied = fx.Graph(), {}
    new_graph.output(new_graph.graph_copy(graph.graph, copied))
    return fx.GraphModule(graph.gm, new_graph), copied


def fuse(graph: Graph) -> tuple[fx.GraphModule, int]:
    """A view of ``graph.gm`` (same tensors, copied FX graph) with one ``outlier_terms``
    node per group of decode-shaped outlier layers that read the same input, and how many
    layers it took (0: ``graph.gm`` itself is returned)."""
    groups = _groups(graph)
    if not groups:
        return graph.gm, 0
    view, copied = view_of(graph)
    fused = 0
    for (x, dim), old_members in groups.items():
        x, members = copied[x], [copied[m] for m in old_members]
        first = members[0]
        for m in members:                               # stored tensors must precede the term
            for a in m.args[1:8]:
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    first.prepend(a)
        values = [m.args[5] for m in members]
        cols = [m.args[6] for m in members]
        counts = [m.args[7] for m in members]
        biases = [m.args[4] for m in members]
        out_features = [int(graph.attr(m.args[1]).shape[0]) for m in old_members]
        width = -1 if dim == 2 else chunk_width([graph.attr(m.args[7]) for m in old_members])
        with view.graph.inserting_before(first):
            term = view.graph.call_function(OUTLIER_TERMS, (x, values, cols, counts, biases, out_features,
                                                            int(first.args[10]), width))
            if len(members) > 1:
                parts = view.graph.call_function(torch.ops.aten.split_with_sizes.default, (term, out_features))
            for i, m in enumerate(members):
                bias = view.graph.call_function(operator.getitem, (parts, i)) if len(members) > 1 else term
                m.args = (*m.args[:4], bias, None, None, None, *m.args[8:])
        fused += len(members)
    view.graph.lint()
    view.recompile()
    return view, fused


# ----------------------------------------------------------------------------- ONNX
def _translate(x, values, cols, counts, biases, out_features, in_features: int, width: int):
    from onnxscript import opset18 as op

    from . import ort_quant as q

    k, total = int(in_features), int(sum(out_features))
    base = None
    if any(b is not None for b in biases):
        base = op.Concat(*[op.Cast(b, to=1) if b is not None else op.Expand(op.Constant(value_float=0.0), q._ints(op, [nf]))
                           for b, nf in zip(biases, out_features)], axis=0)
    if width == -1:
        term = _column_terms(op, q, x, values, cols, out_features, k, total)
        term = term if base is None else op.Add(term, base)
    else:
        term = _row_terms(op, q, x, values, cols, counts, out_features, k, width, base)
    return op.CastLike(term, x)


def _column_terms(op, q, x, values, cols, out_features, k: int, total: int):
    """Whole-column outliers of layers sharing ``x``: one gather of the union of their
    columns and one ``[u] x [u, sum N]`` MatMul (values placed at load)."""
    all_cols = op.Concat(*[q._column_indices(op, q._at_load(op, c), k) for c in cols], axis=0)
    union, _, inverse, _ = op.Unique(all_cols, sorted=1)
    blocks, off = [], 0
    for v, nf in zip(values, out_features):
        vt = op.Transpose(op.Cast(q._at_load(op, v), to=1), perm=[1, 0])               # [c_i, N_i]
        blocks.append(op.Pad(vt, q._ints(op, [0, off, 0, total - off - nf])))
        off += nf
    placed = op.Concat(*blocks, axis=0)                                                # [sum c, sum N]
    zeros = op.Expand(op.Constant(value_float=0.0), op.Concat(op.Shape(union), q._ints(op, [total]), axis=0))
    at = op.Expand(op.Unsqueeze(inverse, q._ints(op, [1])), op.Shape(placed))
    v_union = op.ScatterElements(zeros, at, placed, axis=0, reduction="add")           # [u, sum N]
    rank = q._rank(x)
    if rank == 0:
        return op.Reshape(op.MatMul(op.Gather(x, union, axis=-1), op.CastLike(v_union, x)), q._ints(op, [-1]))
    # x is one row: a GatherND at [0, .., 0, col] gives the picked inputs as a 1-D [u], and
    # the MatMul then gives MatMulNBits' 1-D bias directly (no Reshape: at batch 1 each
    # node's dispatch is most of what the term costs)
    lead = op.Expand(op.Constant(value_int=0), op.Concat(op.Shape(union), q._ints(op, [rank - 1]), axis=0))
    at_cols = op.Concat(lead, op.Unsqueeze(union, q._ints(op, [1])), axis=1)          # [u, rank]
    return op.MatMul(op.GatherND(x, at_cols), op.CastLike(v_union, x))


def _chunks(op, q, values, cols, counts, nnz: int, k: int, width: int, row_offset: int):
    """One layer's outliers as chunks of ``width`` (built at load): int64 cols and fp32
    values ``[R, width]`` (padding reads column 0 with value 0) and each chunk's output row
    ``[R]`` (+ ``row_offset``). Empty rows have no chunk, a row of c outliers ceil(c/width)."""
    i64 = 7
    cols = q._column_indices(op, cols, k)
    counts = op.Cast(counts, to=i64)
    w = q._ints(op, [width])
    chunks = op.Div(op.Add(counts, q._ints(op, [width - 1])), w)
    starts = op.CumSum(counts, q._ints(op, [0]), exclusive=1)                       # first outlier per row
    cstarts = op.CumSum(chunks, q._ints(op, [0]), exclusive=1)                       # first chunk per row
    n_chunks = op.ReduceSum(chunks, keepdims=0)
    # each chunk's row: rows whose first chunk is at or before it, minus one (a scatter of
    # ones at the rows' first chunks and a running sum: a repeat_interleave in ONNX ops)
    marks = op.ScatterElements(op.Expand(op.Constant(value_int=0), op.Reshape(op.Add(n_chunks, op.Constant(value_int=1)), q._ints(op, [1]))),
                               cstarts, op.Expand(op.Constant(value_int=1), op.Shape(cstarts)), axis=0,
                               reduction="add")
    row = op.Sub(op.Slice(op.CumSum(marks, q._ints(op, [0])), q._ints(op, [0]), op.Reshape(n_chunks, q._ints(op, [1]))),
                 op.Constant(value_int=1))                                             # [R]
    offset = op.Add(op.Unsqueeze(op.Mul(op.Sub(op.Range(op.Constant(value_int=0), n_chunks, op.Constant(value_int=1)),
                                                 op.Gather(cstarts, row)), w), q._ints(op, [1])),
                    op.Range(op.Constant(value_int=0), op.Constant(value_int=width), op.Constant(value_int=1)))
    valid = op.Less(offset, op.Unsqueeze(op.Gather(counts, row), q._ints(op, [1])))
    pos = op.Where(valid, op.Add(op.Unsqueeze(op.Gather(starts, row), q._ints(op, [1])), offset), q._ints(op, [nnz]))
    ell_cols = op.Gather(op.Concat(cols, q._ints(op, [0]), axis=0), pos, axis=0)
    ell_vals = op.Gather(op.Concat(op.Cast(values, to=1), op.Constant(value_floats=[0.0]), axis=0), pos, axis=0)
    return ell_cols, ell_vals, op.Add(row, op.Constant(value_int=row_offset))


def _row_terms(op, q, x, values, cols, counts, out_features, k: int, width: int, base):
    """Outliers in rows, for layers sharing ``x``: width 0, every row padded to the group's
    longest (one reduction per output row, no scatter); else chunks of ``width`` whose sums
    are scattered onto their rows (onto the biases, when there are)."""
    if width == 0:
        parts = [q._ell(op, q._at_load(op, v), q._at_load(op, c), q._at_load(op, n), int(v.shape[0]), k)
                 for v, c, n in zip(values, cols, counts)]
        longest = op.ReduceMax(op.Concat(*[op.Shape(c, start=1) for c, _ in parts], axis=0), keepdims=1)
        pad = [op.Sub(longest, op.Shape(c, start=1)) for c, _ in parts]
        ell_cols = op.Concat(*[op.Pad(c, op.Concat(q._ints(op, [0, 0, 0]), p, axis=0)) for (c, _), p in zip(parts, pad)],
                             axis=0)
        ell_vals = op.Concat(*[op.Pad(v, op.Concat(q._ints(op, [0, 0, 0]), p, axis=0)) for (_, v), p in zip(parts, pad)],
                             axis=0)
        term = q._sparse_term(op, x, op.Cast(ell_cols, to=6), op.CastLike(ell_vals, x), int(sum(out_features)), k)
        return term if base is None else op.Add(term, op.CastLike(base, term))
    chunk_cols, chunk_vals, chunk_rows, off = [], [], [], 0
    for v, c, n, nf in zip(values, cols, counts, out_features):
        ec, ev, er = _chunks(op, q, q._at_load(op, v), q._at_load(op, c), q._at_load(op, n), int(v.shape[0]), k, width, off)
        chunk_cols.append(ec), chunk_vals.append(ev), chunk_rows.append(er)
        off += nf
    ell_cols = op.Cast(op.Concat(*chunk_cols, axis=0), to=6)
    ell_vals = op.Concat(*chunk_vals, axis=0)
    rank = q._rank(x)
    flat = q._ints(op, [1] * (max(rank, 2) - 1) + [-1])
    picked = op.GatherElements(x if rank else op.Reshape(x, q._ints(op, [1, k])), op.Reshape(ell_cols, flat), axis=-1)
    sums = op.ReduceSum(op.Reshape(op.Mul(picked, op.Reshape(op.CastLike(ell_vals, x), flat)), q._ints(op, [-1, width])),
                        q._ints(op, [-1]), keepdims=0)                                  # [R]
    data = base if base is not None else op.Expand(op.Constant(value_float=0.0), q._ints(op, [off]))
    return op.ScatterElements(op.CastLike(data, sums), op.Concat(*chunk_rows, axis=0), sums, axis=0, reduction="add")


def translation_table() -> dict:
    """Custom translation for ``torch.onnx.export(custom_translation_table=...)``."""
    return {OUTLIER_TERMS: _translate}


__all__ = ["fuse", "view_of", "one_row", "chunk_width", "translation_table", "OUTLIER_TERMS", "outlier_terms"]
