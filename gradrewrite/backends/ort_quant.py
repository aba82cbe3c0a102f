"""ONNX translations of the quantized ops in ``rewrite/quant_ops.py``.

``quantized_decomposed`` (static int8) already has torchlib translations: they become
QuantizeLinear / DequantizeLinear, which ONNX Runtime fuses into QLinearConv /
QLinearMatMul int8 kernels. This module adds ``gradrewrite::groupwise_linear``:

- 2, 4 and 8 bits: ``com.microsoft.MatMulNBits`` on the packed codes as stored (its
  B / scales / zero_points layouts are ours, see quant_ops), then the fp16 outliers as
  a sparse term made of row-contiguous Gathers, a Mul, a CumSum and a Sub (see
  ``_add_sparse``). Two other forms ran slower on ORT CPU in our measurements and were
  dropped: ScatterND with reduction add, and a row-padded (ELL) Gather along the
  input axis (strided gathers, and padding to the longest row when outliers cluster).
  ``benchmarks/quantization.py`` times this term against MatMulNBits alone.
- 3 bits (MatMulNBits has no 3-bit kernel): the bit stream is unpacked with
  Gather/BitShift/BitwiseAnd and dequantized by standard ops feeding a MatMul, on every
  run (the unpacking reads a zero computed from the input, so neither the exporter nor
  ONNX Runtime folds it: the file and the session keep the 3-bit codes, at the cost of
  an O(N*K) dequantization per call).
"""
from __future__ import annotations

from typing import Any

from ..rewrite.quant_ops import GROUPWISE_LINEAR

NBITS_KERNEL_BITS = (2, 4, 8)


def _matmulnbits_op():
    import onnxscript
    from onnx.defs import OpSchema

    p, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attr, ints = OpSchema.Attribute, OpSchema.AttrType.INT
    # com.microsoft schemas are not in the onnx package; describe the one op we emit.
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[p("A", "T1"), p("B", "T2"), p("scales", "T1"),
                p("zero_points", "T3", param_option=opt), p("g_idx", "T4", param_option=opt),
                p("bias", "T1", param_option=opt)],
        outputs=[p("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""),
                          ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[attr("K", ints, ""), attr("N", ints, ""), attr("bits", ints, ""),
                    attr("block_size", ints, ""), attr("accuracy_level", ints, "")])
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits", schema)


def _ints(op, values: list[int]):
    return op.Constant(value_ints=[int(v) for v in values])


def _unpack(op, packed, bits: int, length: int, zero):
    """uint8 ``[..., B]`` bit streams -> uint32 codes ``[..., length]`` (see quant_ops)."""
    nbytes = (length * bits + 7) // 8
    first = [(i * bits) // 8 for i in range(length)]
    second = [min(b + 1, nbytes - 1) for b in first]
    shift = [(i * bits) % 8 for i in range(length)]
    wide = op.Cast(op.BitwiseOr(packed, op.CastLike(zero, packed)), to=12)   # UINT32, not foldable
    lo = op.Gather(wide, _ints(op, first), axis=-1)
    hi = op.Gather(wide, _ints(op, second), axis=-1)
    both = op.BitwiseOr(lo, op.BitShift(hi, op.Constant(value=_u32(8)), direction="LEFT"))
    shifted = op.BitShift(both, op.Cast(_ints(op, shift), to=12), direction="RIGHT")
    return op.BitwiseAnd(shifted, op.Constant(value=_u32((1 << bits) - 1)))


def _u32(v: int):
    import numpy as np
    import onnx

    return onnx.numpy_helper.from_array(np.array(v, dtype=np.uint32))


def _groupwise_linear(x, packed, scales, zeros, bias, outlier_values, outlier_cols,
                      outlier_rowptr, bits: int, group: int, in_features: int):
    from onnxscript import opset18 as op

    n, n_groups, _ = packed.shape
    k = int(in_features)
    if bits in NBITS_KERNEL_BITS:
        y = _matmulnbits_op()(x, packed, op.CastLike(op.Reshape(scales, _ints(op, [-1])), x),
                              op.Reshape(zeros, _ints(op, [-1])),
                              K=k, N=int(n), bits=int(bits), block_size=int(group))
    else:
        zero = _runtime_zero(op, x)
        codes = op.Cast(_unpack(op, packed, bits, group, zero), to=1)   # [N, G, group]
        zp = op.Cast(_unpack(op, zeros, bits, n_groups, zero), to=1)    # [N, G]
        scales = op.Add(scales, op.CastLike(zero, scales))               # keep fp16 in the file
        w = op.Mul(op.Sub(codes, op.Unsqueeze(zp, _ints(op, [-1]))),
                   op.Unsqueeze(op.Cast(scales, to=1), _ints(op, [-1])))
        w = op.Slice(op.Reshape(w, _ints(op, [int(n), -1])), _ints(op, [0]), _ints(op, [k]),
                     _ints(op, [1]))
        y = op.MatMul(x, op.Transpose(op.CastLike(w, x), perm=[1, 0]))
    if outlier_values is not None and outlier_values.shape[0]:
        y = _add_sparse(op, y, x, outlier_values, outlier_cols, outlier_rowptr, int(n), k)
    if bias is not None:
        y = op.Add(y, bias)
    return y


def _runtime_zero(op, x):
    """int64 ``[0]`` computed from x's values: nodes that use it cannot be constant-folded
    by the exporter, which would otherwise store their (larger) results in the file."""
    first = op.Slice(op.Reshape(x, _ints(op, [-1])), _ints(op, [0]), _ints(op, [1]), _ints(op, [0]))
    return op.Mul(op.Cast(op.IsNaN(first), to=7), op.Constant(value_ints=[0]))


def _add_sparse(op, y, x, values, cols, rowptr, n: int, k: int):
    """y[..., r] += sum over row r's outliers of value * x[..., col] (CSR).

    Row-contiguous gathers only: the input columns the outliers read are gathered as
    rows of x^T ([nnz, M]), scaled by the values, and summed per CSR row as differences
    of a running sum at the row pointers. Every step is O(nnz * M) or O(N * M) dense
    work. The CSR arrays pass through a zero computed from x first, so the exporter
    cannot fold them into wider copies: the file holds them as stored."""
    zero = _runtime_zero(op, x)
    values = op.Add(values, op.CastLike(zero, values))
    rowptr = op.Add(rowptr, op.CastLike(zero, rowptr))
    xt = op.Transpose(op.Reshape(x, _ints(op, [-1, k])), perm=[1, 0])                 # [K, M]
    picked = op.Mul(op.Gather(xt, cols, axis=0),
                    op.Unsqueeze(op.CastLike(values, x), _ints(op, [1])))             # [nnz, M]
    # running sum with a leading zero row: row r's sum = run[rowptr[r+1]] - run[rowptr[r]]
    run = op.CumSum(op.Concat(op.Mul(op.Slice(picked, _ints(op, [0]), _ints(op, [1]), _ints(op, [0])),
                                     op.CastLike(op.Constant(value_float=0.0), x)),
                              picked, axis=0), op.Constant(value_int=0))              # [nnz + 1, M]
    ends = op.Slice(rowptr, _ints(op, [1]), _ints(op, [n + 1]), _ints(op, [0]))
    starts = op.Slice(rowptr, _ints(op, [0]), _ints(op, [n]), _ints(op, [0]))
    term = op.Sub(op.Gather(run, ends, axis=0), op.Gather(run, starts, axis=0))      # [N, M]
    return op.Reshape(op.Add(op.Reshape(y, _ints(op, [-1, n])), op.Transpose(term, perm=[1, 0])),
                      op.Shape(y))


def translation_table() -> dict[Any, Any]:
    """Custom translations for ``torch.onnx.export(custom_translation_table=...)``."""
    return {GROUPWISE_LINEAR: _groupwise_linear}


__all__ = ["translation_table", "NBITS_KERNEL_BITS"]
