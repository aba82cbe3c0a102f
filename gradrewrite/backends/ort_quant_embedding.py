"""ONNX translation of ``gradrewrite::groupwise_embedding`` (``rewrite/quant_embedding_ops.py``).

- 2, 4 and 8 bits: ``com.microsoft.GatherBlockQuantized`` (gather_axis 0, quantize_axis 1,
  block_size = group) on the packed codes viewed as ``[V, G*group*bits/8]``: its uint8
  layout is ours (code ``i`` of a row in bits ``i*bits..``, low nibble first at 4 bits;
  zero points packed the same way along the row), so no code is rewritten.
- 3 bits (GatherBlockQuantized takes uint8 data at 2, 4 or 8 bits only): the packed rows
  are gathered first and only they are unpacked (every 8 codes are exactly 3 bytes) and
  dequantized by standard ops: O(tokens * dim) per call, and the file keeps 3-bit codes.

The buffers are fed as stored, never rewritten into a new initializer: the view of the
codes and the fp32 copy of the fp16 scales are computed from a zero derived from the
indices at run time, so the exporter cannot fold them into second, larger copies. A tied
LM head's ``groupwise_linear`` reads the same ``packed`` / ``scales`` / ``zeros`` graph
inputs, so the file holds the codes once.
"""
from __future__ import annotations

from typing import Any

from ..rewrite.quant_embedding_ops import GROUPWISE_EMBEDDING

GATHER_KERNEL_BITS = (2, 4, 8)


def _gather_block_quantized_op():
    import onnxscript
    from onnx.defs import OpSchema

    p, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attr, ints = OpSchema.Attribute, OpSchema.AttrType.INT
    # com.microsoft schemas are not in the onnx package; describe the one op we emit.
    schema = OpSchema(
        "GatherBlockQuantized", "com.microsoft", 1,
        inputs=[p("data", "T1"), p("indices", "Tind"), p("scales", "T2"),
                p("zero_points", "T1", param_option=opt)],
        outputs=[p("output", "T2")],
        type_constraints=[("T1", ["tensor(uint8)"], ""), ("T2", ["tensor(float)", "tensor(float16)"], ""),
                          ("Tind", ["tensor(int32)", "tensor(int64)"], "")],
        attributes=[attr("gather_axis", ints, ""), attr("quantize_axis", ints, ""),
                    attr("block_size", ints, ""), attr("bits", ints, "")])
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GatherBlockQuantized",
                                schema)


def _ints(op, values: list[int]):
    return op.Constant(value_ints=[int(v) for v in values])


def _zero_from(op, indices):
    """int64 ``[1]`` zero computed from the indices' values (not constant-foldable)."""
    first = op.Slice(op.Reshape(indices, _ints(op, [-1])), _ints(op, [0]), _ints(op, [1]))
    return op.Sub(op.Cast(first, to=7), op.Cast(first, to=7))


def _unpack_words(op, data, bits: int):
    """uint8 bit streams (each row's length a multiple of ``bits``) -> float codes ``[M, 8]``
    in stream order (``M`` = total bytes / bits).

    ``bits`` consecutive bytes hold exactly 8 codes, so each such word is read as one
    little-endian uint32 and split by 8 shifts."""
    word = op.Cast(op.Reshape(data, _ints(op, [-1, bits])), to=12)                # UINT32 [M, bits]
    parts = op.Split(word, axis=1, num_outputs=bits)
    acc = parts[0]
    for b in range(1, bits):
        acc = op.BitwiseOr(acc, op.BitShift(parts[b], op.Cast(_ints(op, [8 * b]), to=12), direction="LEFT"))
    shifts = op.Cast(_ints(op, [i * bits for i in range(8)]), to=12)
    codes = op.BitwiseAnd(op.BitShift(acc, shifts, direction="RIGHT"),
                          op.Cast(_ints(op, [(1 << bits) - 1]), to=12))                 # [M, 8]
    return op.Cast(codes, to=1)


def _groupwise_embedding(indices, packed, scales, zeros, bits: int, group: int, dim: int):
    from onnxscript import opset18 as op

    v, n_groups, _ = packed.shape
    zero = _zero_from(op, indices)
    scales32 = op.Cast(op.Add(scales, op.CastLike(zero, scales)), to=1)   # file keeps fp16
    out_shape = op.Concat(op.Shape(indices), _ints(op, [n_groups * group]), axis=0)
    if bits in GATHER_KERNEL_BITS:
        data = op.Reshape(packed, op.Add(_ints(op, [int(v), -1]), zero))
        rows = _gather_block_quantized_op()(data, indices, scales32, zeros, gather_axis=0,
                                            quantize_axis=1, block_size=int(group), bits=int(bits))
    else:
        flat = op.Reshape(indices, _ints(op, [-1]))                                     # [T]
        codes = op.Reshape(_unpack_words(op, op.Gather(packed, flat, axis=0), bits),
                           _ints(op, [-1, int(n_groups), int(group)]))                   # [T, G, group]
        zbytes = op.Gather(zeros, flat, axis=0)                                          # [T, Z]
        pad = (-zeros.shape[1]) % bits
        if pad:
            zbytes = op.Pad(zbytes, _ints(op, [0, 0, 0, pad]))
        zp = op.Slice(op.Reshape(_unpack_words(op, zbytes, bits),
                                 _ints(op, [-1, (zeros.shape[1] + pad) * 8 // bits])),
                      _ints(op, [0]), _ints(op, [int(n_groups)]), _ints(op, [1]))       # [T, G]
        s = op.Gather(scales32, flat, axis=0)                                            # [T, G]
        rows = op.Mul(op.Sub(codes, op.Unsqueeze(zp, _ints(op, [2]))), op.Unsqueeze(s, _ints(op, [2])))
    rows = op.Reshape(rows, out_shape)
    if n_groups * group != dim:
        rows = op.Slice(rows, _ints(op, [0]), _ints(op, [int(dim)]), _ints(op, [-1]))
    return rows


def translation_table() -> dict[Any, Any]:
    """Custom translations for ``torch.onnx.export(custom_translation_table=...)``."""
    return {GROUPWISE_EMBEDDING: _groupwise_embedding}


__all__ = ["translation_table", "GATHER_KERNEL_BITS"]
