"""Relax converters for quantized graphs (``custom_convert_map`` of TVM's importer).

* ``gradrewrite::tvm_int8_conv2d`` / ``_linear`` (from ``int8_ops.lower_int8``): int8 x int8
  ``nn.conv2d`` / ``matmul`` with ``out_dtype="int32"``, then the requantization in int64
  (``(acc * mult + 2^(t-1)) >> t``), zero point, clamp, cast to int8. The input zero point
  is handled without widening the int8 operand: the input is padded with ``in_zp`` (the
  real value 0) and ``in_zp * sum(w)`` per output channel is folded into the bias, since
  ``sum w (x - zp) = sum w x - zp sum w``. The result is bit-exact against
  ``rewrite.int8_layers.integer_reference``.
* ``gradrewrite::tvm_int8_conv2d_float`` / ``_linear_float`` (layers whose output stays
  float): the same int32 compute and folded bias, then ``float32(acc) * scale`` per output
  channel instead of the requantization (bit-exact against the integer reference too).
* ``gradrewrite::tvm_int8_add``: TFLite's int8 add in int64.
* ``quantized_decomposed`` quantize / dequantize (per tensor): float arithmetic in the
  order PyTorch's reference uses (``round(x * (1/s)) + zp``, round half to even), so the
  int8 values agree with the torch backend; ``dequantize_per_channel`` of a constant
  weight (a layer the int8 matcher did not take) is computed by PyTorch's own op at
  import, an fp32 constant.
* ``gradrewrite::groupwise_linear`` (weight-only): the weight is dequantized at import by
  the op's own ``groupwise_weight`` (codes, scales, zero points and fp16 outliers) into an
  fp32 constant and the layer runs as an fp32 matmul: it compiles and matches the torch
  backend, but the TVM library stores fp32 weights (no low-bit kernel; ORT's MatMulNBits
  is the low-bit path). ``gradrewrite::groupwise_embedding`` likewise: the table is
  dequantized at import and looked up with ``take``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from ...rewrite.quant_embedding_ops import GROUPWISE_EMBEDDING
from ...rewrite.quant_ops import GROUPWISE_LINEAR, dequantize_groupwise, groupwise_weight
from .int8_ops import INT8_OPS


def constant_tensors(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """{placeholder name: tensor} for the program's parameters, buffers and constants."""
    state, consts = ep.state_dict, ep.constants
    out = {}
    for spec in ep.graph_signature.input_specs:
        if spec.target is None:
            continue
        value = state.get(spec.target, consts.get(spec.target))
        if isinstance(value, torch.Tensor):
            out[spec.arg.name] = value.detach()
    return out


def _const(value, dtype: str):
    from tvm import relax

    return relax.const(np.ascontiguousarray(np.asarray(value)), dtype)


class _Converters:
    def __init__(self, constants: dict[str, torch.Tensor]):
        self.constants = constants
        self.counts: dict[str, int] = {}

    def tensor(self, arg) -> torch.Tensor | None:
        """The constant behind a node argument (None when it is computed at run time)."""
        if isinstance(arg, fx.Node) and arg.op == "placeholder":
            return self.constants.get(arg.name)
        return None

    def need(self, node: fx.Node, i: int) -> torch.Tensor:
        t = self.tensor(node.args[i])
        if t is None:
            raise ValueError(f"argument {i} of {node.target} must be a constant weight")
        return t

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    # ------------------------------------------------------------------ requantization
    @staticmethod
    def _requantize(bb, acc, bias: np.ndarray, mult: np.ndarray, shift: np.ndarray, shape: list[int],
                    out_zp: int, lo: int, hi: int):
        """int32 acc -> int8: ``clamp(out_zp + ((acc + bias) * mult + 2^(t-1)) >> t)``."""
        from tvm import relax

        op = relax.op
        total = 31 - shift.astype(np.int64)
        c = lambda v: _const(np.asarray(v, np.int64).reshape(shape), "int64")  # noqa: E731
        acc = bb.emit(op.add(op.astype(acc, "int64"), c(bias)))
        acc = bb.emit(op.add(op.multiply(acc, c(mult)), c(np.left_shift(np.int64(1), total - 1))))
        y = bb.emit(op.add(op.right_shift(acc, c(total)), _const(out_zp, "int64")))
        return bb.emit(op.astype(op.clip(y, lo, hi), "int8"))

    @staticmethod
    def _float_output(bb, acc, bias: np.ndarray, scale: np.ndarray, shape: list[int]):
        """int32 acc -> float32: ``float32(acc + bias) * scale`` (one rounding each, as C)."""
        from tvm import relax

        op = relax.op
        acc = bb.emit(op.add(op.astype(acc, "int64"), _const(np.asarray(bias, np.int64).reshape(shape), "int64")))
        return bb.emit(op.multiply(op.astype(acc, "float32"),
                                   _const(np.asarray(scale, np.float32).reshape(shape), "float32")))

    # ------------------------------------------------------------------ int8 layers
    def _int8_conv2d_acc(self, node: fx.Node, importer, stride, padding, dilation, groups, in_zp):
        """(int32 accumulator, int64 bias with the input zero point folded in) of an int8 conv."""
        from tvm import relax

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        w, bias = self.need(node, 1).numpy(), self.need(node, 2).numpy()
        if in_zp and any(padding):  # pad with the zero point: the padded real value is 0
            ph, pw = padding
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, ph, ph, pw, pw], pad_value=float(in_zp)))
            padding = [0, 0]
        acc = bb.emit(relax.op.nn.conv2d(x, _const(w, "int8"), strides=stride, padding=padding,
                                         dilation=dilation, groups=groups, out_dtype="int32"))
        return acc, bias.astype(np.int64) - in_zp * w.reshape(w.shape[0], -1).astype(np.int64).sum(1)

    def _int8_linear_acc(self, node: fx.Node, importer, in_zp):
        """(int32 accumulator, int64 bias with the input zero point folded in) of an int8 linear."""
        from tvm import relax

        x = importer.env[node.args[0]]
        w, bias = self.need(node, 1).numpy(), self.need(node, 2).numpy()
        acc = importer.block_builder.emit(relax.op.matmul(x, _const(w.T, "int8"), out_dtype="int32"))
        return acc, bias.astype(np.int64) - in_zp * w.astype(np.int64).sum(1)

    def int8_conv2d(self, node: fx.Node, importer) -> Any:
        mult, shift = (self.need(node, i).numpy() for i in (3, 4))
        stride, padding, dilation, groups, in_zp, out_zp, lo, hi = node.args[5:13]
        acc, bias = self._int8_conv2d_acc(node, importer, stride, padding, dilation, groups, in_zp)
        return self._requantize(importer.block_builder, acc, bias, mult, shift, [1, -1, 1, 1], out_zp, lo, hi)

    def int8_linear(self, node: fx.Node, importer) -> Any:
        mult, shift = (self.need(node, i).numpy() for i in (3, 4))
        in_zp, out_zp, lo, hi = node.args[5:9]
        acc, bias = self._int8_linear_acc(node, importer, in_zp)
        return self._requantize(importer.block_builder, acc, bias, mult, shift, [-1], out_zp, lo, hi)

    def int8_conv2d_float(self, node: fx.Node, importer) -> Any:
        acc, bias = self._int8_conv2d_acc(node, importer, *node.args[4:9])
        return self._float_output(importer.block_builder, acc, bias, self.need(node, 3).numpy(), [1, -1, 1, 1])

    def int8_linear_float(self, node: fx.Node, importer) -> Any:
        acc, bias = self._int8_linear_acc(node, importer, node.args[4])
        return self._float_output(importer.block_builder, acc, bias, self.need(node, 3).numpy(), [-1])

    def int8_add(self, node: fx.Node, importer) -> Any:
        from tvm import relax

        from ...rewrite.int8_layers import ADD_SHIFT

        op, bb = relax.op, importer.block_builder
        a, b = importer.env[node.args[0]], importer.env[node.args[1]]
        mult, shift = (self.need(node, i).numpy().astype(np.int64) for i in (2, 3))
        a_zp, b_zp, out_zp, lo, hi = node.args[4:9]
        c = lambda v: _const(v, "int64")  # noqa: E731

        def rescale(v, zp, m, s):
            t = 31 - s
            v = op.multiply(op.subtract(op.astype(v, "int64"), c(zp)), c(1 << ADD_SHIFT))
            return bb.emit(op.right_shift(op.add(op.multiply(v, c(m)), c(1 << (t - 1))), c(t)))

        total = bb.emit(op.add(rescale(a, a_zp, mult[1], shift[1]), rescale(b, b_zp, mult[2], shift[2])))
        return self._requantize(bb, total, np.zeros(1, np.int64), mult[:1], shift[:1], [1], out_zp, lo, hi)

    # ------------------------------------------------------------------ QDQ ops
    def quantize_per_tensor(self, node: fx.Node, importer) -> Any:
        from tvm import relax

        op, bb = relax.op, importer.block_builder
        x = importer.env[node.args[0]]
        scale, zp, qmin, qmax, dtype = node.args[1:6]
        # torch: clamp(round(x * (1.0 / scale)) + zp, qmin, qmax) in float32
        y = op.add(op.round(op.multiply(x, _const(np.float32(1.0 / scale), "float32"))),
                   _const(np.float32(zp), "float32"))
        tvm_dtype = str(dtype).removeprefix("torch.")
        return bb.emit(op.astype(op.clip(y, int(qmin), int(qmax)), tvm_dtype))

    def dequantize_per_tensor(self, node: fx.Node, importer) -> Any:
        from tvm import relax

        op, bb = relax.op, importer.block_builder
        x = importer.env[node.args[0]]
        scale, zp = node.args[1:3]
        # torch: (x.to(float32) - zp) * scale
        y = op.subtract(op.astype(x, "float32"), _const(np.float32(zp), "float32"))
        return bb.emit(op.multiply(y, _const(np.float32(scale), "float32")))

    def dequantize_per_channel(self, node: fx.Node, importer) -> Any:
        args = [self.need(node, i) if i == 0 else (self.tensor(a) if isinstance(a, fx.Node) else a)
                for i, a in enumerate(node.args)]
        with torch.no_grad():
            w = node.target(*args, **node.kwargs)
        self._count("dequantize_per_channel")
        return _const(w.numpy(), "float32")

    def groupwise_linear(self, node: fx.Node, importer) -> Any:
        from tvm import relax

        bb = importer.block_builder
        x = importer.env[node.args[0]]
        packed, scales, zeros = (self.need(node, i) for i in (1, 2, 3))
        o_val, o_col, o_ptr = (None if node.args[i] is None else self.need(node, i) for i in (5, 6, 7))
        bits, group, in_features = node.args[8:11]
        with torch.no_grad():
            w = groupwise_weight(packed, scales, zeros, o_val, o_col, o_ptr, bits, group, in_features)
        y = bb.emit(relax.op.matmul(x, _const(w.t().contiguous().numpy(), "float32")))
        self._count("groupwise_linear")
        bias = node.args[4]
        if bias is not None:
            const = self.tensor(bias)
            y = bb.emit(relax.op.add(y, importer.env[bias] if const is None else
                                     _const(const.float().numpy(), "float32")))
        return y

    def groupwise_embedding(self, node: fx.Node, importer) -> Any:
        from tvm import relax

        packed, scales, zeros = (self.need(node, i) for i in (1, 2, 3))
        with torch.no_grad():
            table = dequantize_groupwise(packed, scales, zeros, *node.args[4:7])
        self._count("groupwise_embedding")
        return importer.block_builder.emit(relax.op.take(_const(table.numpy(), "float32"),
                                                         importer.env[node.args[0]], axis=0))

    def table(self) -> dict[str, Callable]:
        from ...rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_TENSOR

        ops = {INT8_OPS["conv"]: self.int8_conv2d, INT8_OPS["linear"]: self.int8_linear,
               INT8_OPS["add"]: self.int8_add, INT8_OPS["conv-float"]: self.int8_conv2d_float,
               INT8_OPS["linear-float"]: self.int8_linear_float, QUANTIZE_PER_TENSOR: self.quantize_per_tensor,
               DEQUANTIZE_PER_TENSOR: self.dequantize_per_tensor,
               DEQUANTIZE_PER_CHANNEL: self.dequantize_per_channel, GROUPWISE_LINEAR: self.groupwise_linear,
               GROUPWISE_EMBEDDING: self.groupwise_embedding}
        return {op.__name__: fn for op, fn in ops.items()}


def converters(ep: torch.export.ExportedProgram) -> tuple[dict[str, Callable], dict[str, int]]:
    """(custom_convert_map for the importer, {op: times lowered to an fp32 weight}, filled
    while importing: the quantized layers that do not run as integer compute)."""
    conv = _Converters(constant_tensors(ep))
    return conv.table(), conv.counts


__all__ = ["converters", "constant_tensors"]
