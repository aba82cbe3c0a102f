"""int8 quantize / dequantize per tensor outside the int8 layers (a model's input and
output, or a float op between int8 layers)."""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from .....rewrite.quant_ops import DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_TENSOR
from ...program import Val, c_float
from .base import Unsupported, float_in, handles
from .lowerer import Lowerer


@handles(QUANTIZE_PER_TENSOR)
def _quantize(lw: Lowerer, node: fx.Node) -> Val:
    x = float_in(lw, node.args[0])
    scale, zp, qmin, qmax, dtype = node.args[1:6]
    if dtype != torch.int8 or (int(qmin), int(qmax)) != (-128, 127):
        raise Unsupported("only int8 [-128, 127] activations")
    y = lw.new(x.shape, "i8")
    inv = float(np.float32(1.0 / float(scale)))
    lw.emit("gr_quantize_f32_i8", "gr_int8.c",
            f"gr_quantize_f32_i8({x.ptr()}, {y.out()}, {x.numel}, {c_float(inv)}, {int(zp)});", [x], [y])
    return y


@handles(DEQUANTIZE_PER_TENSOR)
def _dequantize(lw: Lowerer, node: fx.Node) -> Val:
    x = lw.contig(lw.val(node.args[0]))
    if x.dtype != "i8":
        raise Unsupported("only int8 dequantize")
    y = lw.new(x.shape, "f32")
    lw.emit("gr_dequantize_i8_f32", "gr_int8.c",
            f"gr_dequantize_i8_f32({x.ptr()}, {y.out()}, {x.numel}, {c_float(float(node.args[1]))}, "
            f"{int(node.args[2])});", [x], [y])
    return y
