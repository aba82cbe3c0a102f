"""ONNX translations of the quantized ops in ``rewrite/quant_ops.py``.

``quantized_decomposed`` (static int8) already has torchlib translations: they become
QuantizeLinear / DequantizeLinear, which ONNX Runtime fuses into QLinearConv /
QLinearMatMul int8 kernels. This module adds ``gradrewrite::groupwise_linear``.

The file keeps the stored form (codes at their own width, fp16 scales, the compact
outliers); whatever ORT's kernels want instead is computed **once, at session load**:
the translation marks each stored tensor with ``AtLoad`` (a marker op the exporter's
constant folding cannot evaluate, so it cannot write wider copies into the file) and
``resolve_at_load`` removes the markers after export. What follows a stored tensor is
then an initializer-only subgraph, which ONNX Runtime folds when it creates the session
(before MatMulNBits prepacks its folded ``B``). ``benchmarks/quant_sparse_term.py``
measured the forms on ORT CPU (1 and 2 threads, decode and prompt shapes):

- 4 bits: ``com.microsoft.MatMulNBits`` on the codes as stored.
- 2 and 3 bits: the codes widened at load into a 4-bit MatMulNBits (same integers, same
  zero points: exact). ORT's own 2-bit kernel ran ~40x slower than its 4-bit one, and
  unpacking 3-bit codes on every call ~200x.
- 8 bits: dequantized at load (outliers included) into an fp32 MatMul: ORT's 8-bit
  MatMulNBits ran ~10x slower than fp32.
- Outliers with an input of more than one row (a prompt, a batch, or a dynamic shape):
  also dequantized at load into fp32, outliers included (MatMulNBits at M = 64 ran at
  fp32 speed, and every sparse form added 3-10x on top). The file is unchanged; the
  session holds fp32 weights.
- Whole-column outliers (``spread=cols``) at one input row: a gather of the ``c`` inputs
  they read and a ``[c] x [c, N]`` MatMul into MatMulNBits' bias (``ort_outlier_terms``).
- Outliers at one input row (batch-1 decode), 2, 3, 4 bits: padded rows (ELL, each row padded to the longest) built at
  load from the stored counts; per call a GatherElements of the inputs they read, a Mul
  by their values, a ReduceSum per row and an Add: the cheapest form measured (a CSR
  CumSum form, ScatterElements / ScatterND with reduction add, a Gather along K, and
  gathers of rows of x^T all cost more; ``SparseToDenseMatMul`` does not load from a
  file, as ORT densifies sparse initializers). The ORT backend builds these one-row terms
  in ``ort_outlier_terms`` before export (rows crowded with outliers cut into chunks, one
  term per input shared by the layers that read it); this translation then sees the term
  as the layer's bias.
- One-row layers of the same bits and group that read one input (q/k/v, gate/up) run as
  one ``MatMulNBits`` over their codes concatenated at load, then a Split
  (``ort_sibling_linears``); the group's outlier term is the wide call's bias as it is.
  Fewer, wider calls: at batch-1 decode each call's dispatch and thread hand-off is a
  large part of its cost.

``OrtOptions.nbits_accuracy_level`` sets MatMulNBits' ``accuracy_level`` (0 by default:
fp32 arithmetic, equal to the torch graph within fp32 rounding; 4 quantizes activations
to int8: faster, not exact).
"""
from __future__ import annotations

from typing import Any

from ..rewrite.quant_ops import COL_OFFSET, GROUPWISE_LINEAR

AT_LOAD_DOMAIN = "gradrewrite.at_load"


def _schema_op(name: str, domain: str, inputs, outputs, types, attributes=()):
    import onnxscript
    from onnx.defs import OpSchema

    schema = OpSchema(name, domain, 1, inputs=inputs, outputs=outputs, type_constraints=types,
                      attributes=list(attributes))
    return onnxscript.values.Op(onnxscript.values.Opset(domain, 1), name, schema)


def _at_load_op():
    from onnx.defs import OpSchema

    p = OpSchema.FormalParameter
    every = ["tensor(uint8)", "tensor(int16)", "tensor(int32)", "tensor(float16)", "tensor(float)"]
    return _schema_op("AtLoad", AT_LOAD_DOMAIN, [p("stored", "T")], [p("same", "T")], [("T", every, "")])


def _matmulnbits_op():
    from onnx.defs import OpSchema

    p, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attr, ints = OpSchema.Attribute, OpSchema.AttrType.INT
    # com.microsoft schemas are not in the onnx package; describe the one op we emit.
    return _schema_op(
        "MatMulNBits", "com.microsoft",
        [p("A", "T1"), p("B", "T2"), p("scales", "T1"), p("zero_points", "T3", param_option=opt),
         p("g_idx", "T4", param_option=opt), p("bias", "T1", param_option=opt)],
        [p("Y", "T1")],
        [("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
         ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""), ("T4", ["tensor(int32)"], "")],
        [attr("K", ints, ""), attr("N", ints, ""), attr("bits", ints, ""),
         attr("block_size", ints, ""), attr("accuracy_level", ints, "")])


def _ints(op, values: list[int]):
    return op.Constant(value_ints=[int(v) for v in values])


def _at_load(op, stored):
    """``stored`` as kept in the file; what is computed from it alone runs at session load."""
    return _at_load_op()(stored)


def _unpack(op, packed, bits: int, length: int):
    """uint8 ``[..., B]`` bit streams -> uint32 codes ``[..., length]`` (see quant_ops)."""
    nbytes = (length * bits + 7) // 8
    first = [(i * bits) // 8 for i in range(length)]
    second = [min(b + 1, nbytes - 1) for b in first]
    shift = [(i * bits) % 8 for i in range(length)]
    wide = op.Cast(packed, to=12)                                          # UINT32
    lo = op.Gather(wide, _ints(op, first), axis=-1)
    hi = op.Gather(wide, _ints(op, second), axis=-1)
    both = op.BitwiseOr(lo, op.BitShift(hi, op.Constant(value=_u32(8)), direction="LEFT"))
    shifted = op.BitShift(both, op.Cast(_ints(op, shift), to=12), direction="RIGHT")
    return op.BitwiseAnd(shifted, op.Constant(value=_u32((1 << bits) - 1)))


def _as_4bit(op, packed, bits: int, length: int, rank: int):
    """``bits``-bit streams -> the same codes as 4-bit streams (MatMulNBits' layout)."""
    codes = _unpack(op, packed, bits, length)
    if length % 2:                                    # a byte holds two codes: pad the last
        codes = op.Pad(codes, _ints(op, [0] * (2 * rank - 1) + [1]))
        length += 1
    lo = op.Gather(codes, _ints(op, range(0, length, 2)), axis=-1)
    hi = op.Gather(codes, _ints(op, range(1, length, 2)), axis=-1)
    return op.Cast(op.BitwiseOr(lo, op.BitShift(hi, op.Constant(value=_u32(4)), direction="LEFT")), to=2)


def _u32(v: int):
    import numpy as np
    import onnx

    return onnx.numpy_helper.from_array(np.array(v, dtype=np.uint32))


def _ell(op, values, cols, counts, nnz: int, k: int):
    """Stored outliers -> rows padded to the longest: int32 cols ``[N, c]`` and fp32 values
    ``[N, c]`` (padding reads column 0 with value 0)."""
    cols = _column_indices(op, cols, k)
    counts = op.Cast(counts, to=7)                                               # INT64
    starts = op.CumSum(counts, _ints(op, [0]), exclusive=1)
    slots = op.Range(op.Constant(value_int=0), op.ReduceMax(counts, keepdims=0), op.Constant(value_int=1))
    pos = op.Add(op.Unsqueeze(starts, _ints(op, [1])), slots)                  # [N, c]
    pos = op.Where(op.Less(slots, op.Unsqueeze(counts, _ints(op, [1]))), pos, _ints(op, [nnz]))
    ell_cols = op.Gather(op.Concat(cols, _ints(op, [0]), axis=0), pos, axis=0)
    ell_vals = op.Gather(op.Concat(op.Cast(values, to=1), op.Constant(value_floats=[0.0]), axis=0), pos, axis=0)
    return op.Cast(ell_cols, to=6), ell_vals


def _column_indices(op, cols, k: int):
    """Stored column indices -> int64 columns (built at load)."""
    cols = op.Cast(cols, to=7)
    if k <= 2 * COL_OFFSET:                           # int16 storage holds col - COL_OFFSET
        cols = op.Add(cols, _ints(op, [COL_OFFSET]))
    return cols


def _sparse_term(op, x, ell_cols, ell_vals, n: int, k: int):
    """``(x @ S^T)`` as ``[N]`` for one input row, S in padded rows: one GatherElements of
    the inputs the outliers read (ORT's Gather along the last axis cost several times more
    per element), a Mul by their values, a ReduceSum per output feature. The indices take
    x's rank (leading 1s), so x needs no reshape; the result feeds MatMulNBits' bias input,
    so no Add either: per call the term is four small ops."""
    rank = _rank(x)
    flat = _ints(op, [1] * (max(rank, 2) - 1) + [-1])     # the indices' shape: x's rank, all in the last axis
    picked = op.GatherElements(x if rank else op.Reshape(x, _ints(op, [1, k])),
                               op.Reshape(ell_cols, flat), axis=-1)
    prod = op.Mul(picked, op.Reshape(ell_vals, flat))
    return op.ReduceSum(op.Reshape(prod, _ints(op, [n, -1])), _ints(op, [-1]), keepdims=0)   # [N]


def _rank(x) -> int:
    """x's rank when the exporter knows it (0: unknown)."""
    try:
        return len(x.shape)
    except (TypeError, AttributeError):
        return 0


def _dense_weight(op, packed, scales, zeros, values, cols, counts, bits, group, n, n_groups, k):
    """fp32 ``W^T [K, N]`` (codes dequantized, outliers added): an initializer-only
    subgraph ORT folds at load."""
    codes = op.Cast(_unpack(op, _at_load(op, packed), bits, group), to=1)        # [N, G, group]
    zp = op.Cast(_unpack(op, _at_load(op, zeros), bits, n_groups), to=1)        # [N, G]
    w = op.Mul(op.Sub(codes, op.Unsqueeze(zp, _ints(op, [-1]))),
               op.Unsqueeze(op.Cast(_at_load(op, scales), to=1), _ints(op, [-1])))
    w = op.Slice(op.Reshape(w, _ints(op, [n, -1])), _ints(op, [0]), _ints(op, [k]), _ints(op, [1]))
    if values is not None and len(values.shape) == 2:   # whole columns: [N, c] at [c] columns
        at = op.Expand(op.Unsqueeze(_column_indices(op, _at_load(op, cols), k), _ints(op, [0])),
                       _ints(op, [n, int(values.shape[1])]))
        outliers = op.ScatterElements(op.Mul(w, op.Constant(value_float=0.0)), at,
                                      op.Cast(_at_load(op, values), to=1), axis=1, reduction="add")
        w = op.Add(w, outliers)
    elif values is not None:
        ell_cols, ell_vals = _ell(op, _at_load(op, values), _at_load(op, cols), _at_load(op, counts),
                                  int(values.shape[0]), k)
        # padding adds 0.0 at column 0; torch adds the same dense S (zeros elsewhere)
        outliers = op.ScatterElements(op.Mul(w, op.Constant(value_float=0.0)), op.Cast(ell_cols, to=7),
                                      ell_vals, axis=1, reduction="add")
        w = op.Add(w, outliers)
    return op.Transpose(w, perm=[1, 0])


def nbits_layout(op, packed, zeros, bits: int, group: int, n_groups: int):
    """A layer's stored codes and zero points in MatMulNBits' 4-bit layout, built at load:
    4-bit as stored, 2/3-bit widened (the same integers and zero points: exact)."""
    if bits == 4:
        return _at_load(op, packed), _at_load(op, zeros)
    return _as_4bit(op, _at_load(op, packed), bits, group, 3), _as_4bit(op, _at_load(op, zeros), bits, n_groups, 2)


def matmul_nbits(op, x, codes, scales, zeros, bias, *, k: int, n: int, group: int, accuracy_level: int = 0):
    """``MatMulNBits`` on 4-bit ``codes`` ``[N, G, group/2]``, flat fp16 ``scales`` (they
    stay fp16 in the file: the exporter would store the fp32 cast) and flat zero points."""
    return _matmulnbits_op()(x, codes, op.CastLike(scales, x), zeros, None, bias, K=int(k), N=int(n), bits=4,
                             block_size=int(group), accuracy_level=int(accuracy_level))


def _groupwise_linear(x, packed, scales, zeros, bias, outlier_values, outlier_cols,
                      outlier_counts, bits: int, group: int, in_features: int, *, accuracy_level: int = 0):
    from onnxscript import opset18 as op

    n, n_groups, _ = packed.shape
    n, k = int(n), int(in_features)
    has_outliers = outlier_values is not None and outlier_values.shape[0]
    # 8 bits, or outliers still here: a one-row layer's outliers were moved into its bias
    # by ort_outlier_terms.fuse before export, so these come with more rows (a prompt),
    # where the per-row cost of any sparse form grows with M while MatMulNBits at M > 1
    # runs fp32 GEMM anyway
    if bits == 8 or has_outliers:
        w = _dense_weight(op, packed, scales, zeros, outlier_values if has_outliers else None,
                          outlier_cols, outlier_counts, bits, group, n, n_groups, k)
        y = op.MatMul(x, op.CastLike(w, x))
    else:
        packed, zeros = nbits_layout(op, packed, zeros, bits, group, n_groups)
        # the layer's bias (with a fused outlier term) goes in as MatMulNBits' bias: no Add
        return matmul_nbits(op, x, packed, op.Reshape(_at_load(op, scales), _ints(op, [-1])),
                            op.Reshape(zeros, _ints(op, [-1])), bias, k=k, n=n, group=int(group),
                            accuracy_level=accuracy_level)
    if bias is not None:
        y = op.Add(y, bias)
    return y


def resolve_at_load(model) -> int:
    """Remove the ``AtLoad`` markers from an exported ``onnx_ir`` model (each user reads
    the stored tensor directly); returns how many were removed."""
    import onnx_ir as ir

    removed = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.domain == AT_LOAD_DOMAIN:
            ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
            node.graph.remove(node, safe=True)
            removed += 1
    model.opset_imports.pop(AT_LOAD_DOMAIN, None)
    return removed


def translation_table(*, accuracy_level: int = 0) -> dict[Any, Any]:
    """Custom translations for ``torch.onnx.export(custom_translation_table=...)``."""
    import functools

    return {GROUPWISE_LINEAR: functools.partial(_groupwise_linear, accuracy_level=accuracy_level)}


__all__ = ["translation_table", "resolve_at_load", "AT_LOAD_DOMAIN"]
