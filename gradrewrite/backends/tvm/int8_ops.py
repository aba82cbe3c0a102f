"""Integer layer ops the tvm backend lowers static int8 chains into before import.

``lower_int8`` replaces every ``quantize(act(layer(dequant(xq), dequant_per_channel(wq),
b)))`` chain that ``rewrite.int8_layers.match`` recognises (conv, linear, residual add,
with their fused ReLU/ReLU6 clamp and trailing max pools) by one of three ops on int8
tensors. Their arguments carry the integer parameters the matcher derived (int32 bias
``round(b / (s_x s_w))``, per-channel multiplier and shift, zero points, clamp bounds),
so the op is self-describing: torch can run it (the reference semantics below, the same
arithmetic as ``int8.integer_reference``) and ``int8_relax`` turns it into int8 x int8 ->
int32 Relax compute. Matching happens here, on the unlifted graph, because the matcher
reads weights from ``get_attr`` nodes and the chain is still in one piece; after import
it is spread over a dozen Relax ops.

Semantics (TFLite / CMSIS-NN): ``acc = sum w * (x - in_zp)`` (zero padding in the real
domain), ``acc += bias``, ``y = clamp(out_zp + ((acc * mult + 2^(t-1)) >> t), act_min,
act_max)`` with ``t = 31 - shift`` per output channel. ``int8_add`` rescales both inputs
at 2^20 resolution first (``mult``/``shift`` = [output, a, b]). A conv/linear whose output
stays float (``quantize(outputs=auto)``, ``int8_layers.match_float_output``) becomes
``tvm_int8_conv2d_float`` / ``tvm_int8_linear_float``: the same accumulator, bias included,
then ``float32(acc) * scale`` per output channel (float32 out, no requantization).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.fx as fx

from ...rewrite.graph import Graph, copy_meta
from ...rewrite.quant_ops import QUANTIZE_PER_TENSOR
from ...rewrite import int8_layers as qmatch

aten = torch.ops.aten


def _requant(acc: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return torch.from_numpy(qmatch.requantize(acc.numpy(), mult.numpy().reshape(shape),
                                              shift.numpy().reshape(shape)))


def _finish(acc: torch.Tensor, mult, shift, shape, out_zp: int, act_min: int, act_max: int) -> torch.Tensor:
    y = _requant(acc, mult, shift, shape) + out_zp
    return y.clamp(act_min, act_max).to(torch.int8)


@torch.library.custom_op("gradrewrite::tvm_int8_conv2d", mutates_args=())
def int8_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mult: torch.Tensor,
                shift: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
                groups: int, in_zp: int, out_zp: int, act_min: int, act_max: int) -> torch.Tensor:
    """int8 NCHW conv, int32 accumulation, per-channel requantization to int8."""
    acc = torch.nn.functional.conv2d(x.double() - in_zp, weight.double(), None, stride, padding,
                                     dilation, groups)  # exact: float64 holds the int32 sums
    acc = acc.round().to(torch.int64) + bias.to(torch.int64).reshape(1, -1, 1, 1)
    return _finish(acc, mult, shift, [1, -1, 1, 1], out_zp, act_min, act_max)


@int8_conv2d.register_fake
def _(x, weight, bias, mult, shift, stride, padding, dilation, groups, in_zp, out_zp, act_min, act_max):
    h, w = (((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i]) + 1
            for i in range(2))
    return x.new_empty((x.shape[0], weight.shape[0], h, w), dtype=torch.int8)


@torch.library.custom_op("gradrewrite::tvm_int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mult: torch.Tensor,
                shift: torch.Tensor, in_zp: int, out_zp: int, act_min: int, act_max: int) -> torch.Tensor:
    """int8 ``x @ weight.T`` ([..., K] x [N, K]), int32 accumulation, requantized to int8."""
    acc = ((x.double() - in_zp) @ weight.double().t()).round().to(torch.int64) + bias.to(torch.int64)
    return _finish(acc, mult, shift, [-1], out_zp, act_min, act_max)


@int8_linear.register_fake
def _(x, weight, bias, mult, shift, in_zp, out_zp, act_min, act_max):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.int8)


@torch.library.custom_op("gradrewrite::tvm_int8_add", mutates_args=())
def int8_add(a: torch.Tensor, b: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor, a_zp: int,
             b_zp: int, out_zp: int, act_min: int, act_max: int) -> torch.Tensor:
    """TFLite's int8 add: both inputs rescaled at 2^20 resolution, summed, requantized."""
    m, s = mult.to(torch.int64), shift.to(torch.int64)
    one = [1]
    av = _requant((a.to(torch.int64) - a_zp) << qmatch.ADD_SHIFT, m[1:2], s[1:2], one)
    bv = _requant((b.to(torch.int64) - b_zp) << qmatch.ADD_SHIFT, m[2:3], s[2:3], one)
    return _finish(av + bv, m[0:1], s[0:1], one, out_zp, act_min, act_max)


@int8_add.register_fake
def _(a, b, mult, shift, a_zp, b_zp, out_zp, act_min, act_max):
    return torch.empty_like(a, dtype=torch.int8)


def _float_out(acc: torch.Tensor, scale: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return torch.from_numpy(acc.numpy().astype(np.float32) * scale.numpy().reshape(shape))


@torch.library.custom_op("gradrewrite::tvm_int8_conv2d_float", mutates_args=())
def int8_conv2d_float(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor,
                      stride: list[int], padding: list[int], dilation: list[int], groups: int,
                      in_zp: int) -> torch.Tensor:
    """int8 NCHW conv, int32 accumulation, float32 output ``acc * scale[c]``."""
    acc = torch.nn.functional.conv2d(x.double() - in_zp, weight.double(), None, stride, padding,
                                     dilation, groups)
    acc = acc.round().to(torch.int64) + bias.to(torch.int64).reshape(1, -1, 1, 1)
    return _float_out(acc, scale, [1, -1, 1, 1])


@int8_conv2d_float.register_fake
def _(x, weight, bias, scale, stride, padding, dilation, groups, in_zp):
    h, w = (((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i]) + 1
            for i in range(2))
    return x.new_empty((x.shape[0], weight.shape[0], h, w), dtype=torch.float32)


@torch.library.custom_op("gradrewrite::tvm_int8_linear_float", mutates_args=())
def int8_linear_float(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor,
                      in_zp: int) -> torch.Tensor:
    """int8 ``x @ weight.T``, int32 accumulation, float32 output ``acc * scale[n]``."""
    acc = ((x.double() - in_zp) @ weight.double().t()).round().to(torch.int64) + bias.to(torch.int64)
    return _float_out(acc, scale, [-1])


@int8_linear_float.register_fake
def _(x, weight, bias, scale, in_zp):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


INT8_OPS = {"conv": torch.ops.gradrewrite.tvm_int8_conv2d.default,
            "linear": torch.ops.gradrewrite.tvm_int8_linear.default,
            "add": torch.ops.gradrewrite.tvm_int8_add.default,
            "conv-float": torch.ops.gradrewrite.tvm_int8_conv2d_float.default,
            "linear-float": torch.ops.gradrewrite.tvm_int8_linear_float.default}


def _meta_int8(node: fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    return torch.empty(tuple(val.shape), dtype=torch.int8, device="meta") if isinstance(val, torch.Tensor) else None


def _buffer(graph: Graph, name: str, value: np.ndarray | torch.Tensor, dtype: torch.dtype, before: fx.Node) -> fx.Node:
    t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    return graph.add_attr(name, t.to(dtype), before=before, parameter=False)


def _emit(graph: Graph, ql: qmatch.QLayer, index: int, new: dict[fx.Node, fx.Node]) -> fx.Node:
    """The integer op (and its int8 max pools) for ``ql``; ``new`` maps the quantize nodes
    already replaced to their integer ops (a layer's input is often the previous head)."""
    g, head = graph.graph, ql.head
    xa, xb = new.get(ql.x, ql.x), new.get(ql.x2, ql.x2)
    tail = (ql.act, ql.layer)
    scalars = (ql.out_zp, ql.act_min, ql.act_max)
    if ql.float_out:   # no requantization: the per-channel scale of the float output instead
        mult = shift = None
        scale = _buffer(graph, f"_tvm_int8_{index}_out_scale", ql.out_scale, torch.float32, head)
    else:
        mult = _buffer(graph, f"_tvm_int8_{index}_mult", ql.mult, torch.int32, head)
        shift = _buffer(graph, f"_tvm_int8_{index}_shift", ql.shift, torch.int32, head)
    with g.inserting_before(head):
        if ql.kind == "add":
            node = g.call_function(INT8_OPS["add"], (xa, xb, mult, shift, ql.in_zp, ql.in2_zp, *scalars))
        else:
            weight = _buffer(graph, f"_tvm_int8_{index}_weight", ql.weight, torch.int8, head)
            bias = _buffer(graph, f"_tvm_int8_{index}_bias", ql.bias_q, torch.int32, head)
            x = xa
            if ql.view is not None:  # flatten(dequant(xq)) == dequant(flatten(xq))
                x = g.call_function(aten.reshape.default, (x, list(ql.view.meta["val"].shape)))
                copy_meta(ql.view, x)
                x.meta["val"] = _meta_int8(ql.view)
            if ql.kind == "conv":
                c = ql.conv
                geometry = (list(c["stride"]), list(c["padding"]), list(c["dilation"]), c["groups"], ql.in_zp)
                node = g.call_function(INT8_OPS["conv-float"], (x, weight, bias, scale, *geometry)) \
                    if ql.float_out else \
                    g.call_function(INT8_OPS["conv"], (x, weight, bias, mult, shift, *geometry, *scalars))
            elif ql.float_out:
                node = g.call_function(INT8_OPS["linear-float"], (x, weight, bias, scale, ql.in_zp))
            else:
                node = g.call_function(INT8_OPS["linear"], (x, weight, bias, mult, shift, ql.in_zp, *scalars))
        copy_meta(ql.layer, node)
        node.meta["val"] = ql.layer.meta.get("val") if ql.float_out else \
            _meta_int8(next(n for n in tail if n is not None))
        for pool in ql.post:  # max pools commute with the monotone quantization: run them on int8
            node = g.call_function(aten.max_pool2d.default, (node, *pool.args[1:]), dict(pool.kwargs))
            copy_meta(pool, node)
            node.meta["val"] = _meta_int8(pool)
    return node


def _erase_unused(g: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and, transitively, the inputs only it used: the replaced float chain.
    (fx's eliminate_dead_code keeps it: the chain's in-place ``relu_`` counts as impure.)"""
    todo, erased = [node], set()
    while todo:
        n = todo.pop()
        if n not in erased and n.op == "call_function" and not n.users:
            inputs = n.all_input_nodes
            g.erase_node(n)
            erased.add(n)
            todo.extend(inputs)


def lower_int8(graph: Graph) -> tuple[Graph, dict[str, int]]:
    """A copy of ``graph`` with every matched int8 chain replaced by an integer op, and
    {"int8-conv"|"int8-linear"|"int8-add"|"int8-conv-float"|"int8-linear-float": count}
    (``-float``: the layer's output stays float). ``graph`` itself is left untouched."""
    if not any(n.op == "call_function" and n.target == QUANTIZE_PER_TENSOR for n in graph.nodes):
        return graph, {}
    out = graph.clone()
    layers = qmatch.find(out, float_outputs=True)
    fired: Counter[str] = Counter()
    new: dict[fx.Node, fx.Node] = {}
    for i, ql in enumerate(layers.values()):  # graph order: inputs are lowered first
        new[ql.head] = node = _emit(out, ql, i, new)
        ql.head.replace_all_uses_with(node)
        _erase_unused(out.graph, ql.head)
        fired[f"int8-{ql.kind}" + ("-float" if ql.float_out else "")] += 1
    out.commit()
    return out, dict(sorted(fired.items()))


__all__ = ["lower_int8", "int8_conv2d", "int8_linear", "int8_add", "int8_conv2d_float", "int8_linear_float",
           "INT8_OPS"]
