"""The int8 training step as the device runs it ("device form" of a step graph).

An int8 training step is captured from the ``quantize`` pass's static int8 graph made
trainable (``passes.qas.trainable_int8``): weights are float parameters ``<w>_q``
holding integers times a per-channel scale, activations go through
``fake_quantize_per_tensor_affine`` (straight-through backward), and ``qas`` scales
the weight gradients by s^-2. The device keeps the integers: int8 weights, int32
biases, int8 activations; only gradients are fp32. ``device_form`` rewrites the step
graph into exactly that computation, so the mcu lowering and the integer reference
(``reference.py``) read one graph:

- each fake quantizer becomes ``dequantize(quantize(x))`` (what ``int8.find`` matches as
  integer layers); its backward mask becomes ``ste_s8(g, q, qmin, qmax)``, computed
  from the int8 value: gradients pass where q is strictly inside (qmin, qmax);
- a backward op that read a float value inside an int8 layer (the pre-activation that
  ``relu``/``hardtanh`` backward tests) reads the layer's dequantized int8 output
  instead: the device keeps nothing else;
- each forward weight ``mul(w_q, s)`` is read by its conv/linear as
  ``dequantize_per_channel`` of an int8 copy (``<w>_i8``), so the layer lowers to the
  int8 kernel; backward readers keep ``mul(w_q, s)`` (int8 weights times scales);
- ``addmm`` layers become ``linear``; their backward matmuls become ``linear_bwd_input``
  / ``linear_bwd_weight`` (fixed summation orders);
- a float classifier head (the last linear layer, kept float by quantize's ``exclude``)
  becomes ``float_linear`` with float backward and SGD (``float_head.py``).

Updates are unchanged in the graph; the lowering and the reference give them integer
semantics (QAS factor, rounding, saturation), described in ``kernels/gr_train.h``.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ....rewrite.graph import Graph, copy_meta, module_path, op_name
from ....rewrite.int8_layers import find
from ....rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_TENSOR
from ..inference.lowering.base import Unsupported
from .float_head import float_linear, float_param, head_weight, rewrite_head

aten = torch.ops.aten
FAKE_QUANT = aten.fake_quantize_per_tensor_affine_cachemask.default
ACTS = (aten.relu.default, aten.hardtanh.default, aten.clamp.default)
VIEWS = (aten.t.default, aten.permute.default)


# ------------------------------------------------------------------ device ops
def ste_s8(g: torch.Tensor, q: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The straight-through gradient of an int8 quantizer, from its int8 output."""
    return torch.where((q > qmin) & (q < qmax), g, torch.zeros((), dtype=g.dtype))


def mask_bits(q: torch.Tensor, qmin: int, qmax: int, scale: float, zp: int, lo: float, hi: float) -> torch.Tensor:
    """Where a gradient passes an int8 layer's output q: inside the quantizer's range
    (qmin < q < qmax) and the activation's (lo < dq(q) < hi); kept as one bit per element."""
    v = (q.to(torch.float32) - zp) * scale
    return (q > qmin) & (q < qmax) & (v > lo) & (v < hi)


def masked_grad(g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m, g, torch.zeros((), dtype=g.dtype))


def pad_s8(q: torch.Tensor, pads: tuple, value: int) -> torch.Tensor:
    """``pad(dequantize(q))`` with 0.0, as the device runs it: q padded with its zero
    point (``gr_pad_s8``); ``pads`` as ``constant_pad_nd`` takes them (last dim first)."""
    return torch.nn.functional.pad(q, [int(v) for v in pads], value=int(value))


def linear_bwd_input(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """gx = g @ w for y = x w^T (w: out x in)."""
    return g @ w


def linear_bwd_weight(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """gw = g^T @ x (out x in)."""
    return g.t() @ x


def bias_bound(ql) -> int:
    """The largest |int32 bias| of an int8 conv/linear whose accumulator (bias, then
    fan-in terms (x - zp) * w of at most 255 * 127 each) cannot overflow int32 on any
    input. A degenerate activation scale (a dead layer's ~0 range) puts the bias, or
    one update of it (QAS moves it by lr * g / (s_x * s_w)), beyond it: there C's int32
    accumulator would wrap where the reference's does not. Both saturate here instead."""
    return int(2 ** 31 - 1 - int(ql.weight[0].numel()) * 255 * 127)


def bounded_layers(layers: dict) -> dict:
    """``int8.find``'s layers with every conv/linear bias within ``bias_bound``, as the
    int8 step's lowering and its reference both read them."""
    out = {}
    for head, ql in layers.items():
        if ql.kind in ("conv", "linear") and ql.bias_q is not None:
            b = bias_bound(ql)
            ql = dataclasses.replace(ql, bias_q=np.clip(ql.bias_q, -b, b).astype(np.int32))
        out[head] = ql
    return out


def is_int8_step(graph: Graph) -> bool:
    return any(n.op == "call_function" and n.target == FAKE_QUANT for n in graph.gm.graph.nodes)


def _val(shape, dtype) -> torch.Tensor:
    return torch.empty(tuple(int(s) for s in shape), dtype=dtype)


def _role(n: fx.Node) -> str | None:
    return n.meta.get("custom", {}).get("train_role")


def scaled_weight(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """``mul(w_q, s)`` of two ``get_attr`` nodes (through t/permute views) -> (w_q, s)."""
    while isinstance(node, fx.Node) and node.target in VIEWS:
        node = node.args[0]
    if isinstance(node, fx.Node) and node.target == aten.mul.Tensor and len(node.args) == 2 \
            and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args):
        return node.args[0], node.args[1]
    return None


def device_form(step: Graph, *, check: bool = True) -> Graph:
    """A copy of the int8 training-step graph in the device's form (module docstring);
    ``check``: refuse the first op without a bit-exact reference (``inexact_ops``)."""
    g = step.clone()
    graph = g.gm.graph
    drop_identities(g)
    pre_quant: dict[fx.Node, fx.Node] = {}   # float node inside an int8 layer -> its dq output
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target != FAKE_QUANT:
            continue
        x, scale, zp, qmin, qmax = n.args
        if (int(qmin), int(qmax)) != (-128, 127):
            raise Unsupported(f"fake quantizer {n.name} is not int8 [-128, 127]")
        shape = n.meta["val"][0].shape
        with graph.inserting_before(n):
            q = graph.call_function(QUANTIZE_PER_TENSOR, (x, scale, zp, qmin, qmax, torch.int8))
            dq = graph.call_function(DEQUANTIZE_PER_TENSOR, (q, scale, zp, qmin, qmax, torch.int8))
        for new, dt in ((q, torch.int8), (dq, torch.float32)):
            copy_meta(n, new)
            new.meta["val"] = _val(shape, dt)
            new.meta["custom"] = {"train_role": "forward"}
        for item in list(n.users):
            if item.target is not operator.getitem:
                raise Unsupported(f"{n.name}: a fake quantizer read other than by index")
            if item.args[1] == 0:
                item.replace_all_uses_with(dq)
            else:  # the mask: its readers multiply a gradient by it
                for m in list(item.users):
                    other = [a for a in m.args if a is not item]
                    if m.target != aten.mul.Tensor or len(other) != 1:
                        raise Unsupported(f"{m.name}: the quantizer mask is read other than by a gradient mul")
                    with graph.inserting_before(m):
                        ste = graph.call_function(ste_s8, (other[0], q, int(qmin), int(qmax)))
                    copy_meta(m, ste, keep_val=True)
                    ste.meta["custom"] = {"train_role": "backward"}
                    m.replace_all_uses_with(ste)
                    graph.erase_node(m)
            graph.erase_node(item)
        graph.erase_node(n)
        # the float values the int8 layer computes before this quantizer
        v = x
        while isinstance(v, fx.Node):
            pre_quant[v] = dq
            if v.target in ACTS:
                v = v.args[0]
            else:
                break
    # backward readers of pre-quantization floats read the int8 output instead
    for v, dq in pre_quant.items():
        for u in list(v.users):
            if _role(u) == "backward":
                if u.target not in (aten.threshold_backward.default, aten.hardtanh_backward.default):
                    raise Unsupported(f"{u.name} ({u.target}) reads {v.name}, a float the int8 layer does not "
                                      "keep; only relu / hardtanh backward can read its int8 output")
                u.replace_input_with(v, dq)
    _fold_requantize(g)
    _int8_pads(g)
    _int8_weights(g)
    _linear_backward(g)
    for n in list(graph.nodes):  # max-pool indices nobody reads: plain max pooling, as int8 runs it
        if n.target == aten.max_pool2d_with_indices.default:
            idx_users = [u for u in n.users if u.args[1] == 1 and u.users]
            if idx_users:
                raise Unsupported("int8 training through max pooling (its backward needs float argmax "
                                  "indices); train only layers after the pooling")
            with graph.inserting_before(n):
                mp = graph.call_function(aten.max_pool2d.default, n.args)
            copy_meta(n, mp)
            mp.meta["val"] = n.meta["val"][0]
            for u in list(n.users):
                if u.args[1] == 0:
                    u.replace_all_uses_with(mp)
                graph.erase_node(u)
            graph.erase_node(n)
    _scale_before_expand(g)
    _bit_masks(g)
    graph.eliminate_dead_code()
    g.commit()
    if check:
        _check_ops(g)
    return g


PADS = (aten.constant_pad_nd.default, aten.pad.default)
DROPOUTS = (aten.dropout.default, aten.dropout_.default)


def pad_widths(n: fx.Node) -> list[int] | None:
    """A constant pad's widths (last dim first, as ``constant_pad_nd``), or None."""
    if n.target == aten.pad.default and (list(n.args) + [None, None])[2] not in (None, "constant"):
        return None
    return [int(v) for v in n.args[1]]


def pad_fill(n: fx.Node) -> float:
    a = list(n.args) + [None, None]
    return float((a[3] if n.target == aten.pad.default else a[2]) or 0.0)


def identity_of(n: fx.Node) -> fx.Node | None:
    """The input of an op that passes it through unchanged: a pad of width 0 everywhere,
    dropout outside training (the step is captured in eval mode: ``dropout(x, p, False)``)."""
    if n.op != "call_function":
        return None
    if n.target in PADS and pad_widths(n) is not None and not any(pad_widths(n)):
        return n.args[0]
    if n.target in DROPOUTS and len(n.args) > 2 and n.args[2] is False:
        return n.args[0]
    return None


def drop_identities(g: Graph) -> None:
    graph = g.gm.graph
    for n in list(graph.nodes):
        src = identity_of(n)
        if src is not None:
            n.replace_all_uses_with(src)
            graph.erase_node(n)


def _fold_requantize(g: Graph) -> None:
    """``quantize(dequantize(q))`` with the same scale and zero point is q (two quantizers
    in a row, e.g. around a pad of width 0 that was dropped), and a second dequantize of
    one int8 tensor is the first: one int8 value, one float view of it."""
    graph = g.gm.graph
    for n in list(graph.nodes):
        dq = n.args[0] if n.op == "call_function" and n.target == QUANTIZE_PER_TENSOR else None
        if isinstance(dq, fx.Node) and dq.target == DEQUANTIZE_PER_TENSOR and tuple(dq.args[1:]) == tuple(n.args[1:]):
            n.replace_all_uses_with(dq.args[0])
            graph.erase_node(n)
    first: dict[tuple, fx.Node] = {}
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target == DEQUANTIZE_PER_TENSOR:
            key = (n.args[0], *n.args[1:])
            if key in first:
                n.replace_all_uses_with(first[key])
                graph.erase_node(n)
            else:
                first[key] = n


def _int8_pads(g: Graph) -> None:
    """``pad(dequantize(q), 0.0)`` -> ``dequantize(pad_s8(q, zero point))``: the conv after
    it reads an int8 activation again (TF-style "same" padding, e.g. transformers'
    MobileNetV2 with ``tf_padding``)."""
    graph = g.gm.graph
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in PADS or _role(n) == "backward":
            continue
        dq, widths = n.args[0], pad_widths(n)
        if widths is None or min(widths) < 0 or pad_fill(n) != 0.0 or not (
                isinstance(dq, fx.Node) and dq.target == DEQUANTIZE_PER_TENSOR and dq.args[5] == torch.int8):
            continue
        q, scale, zp = dq.args[:3]
        with graph.inserting_before(n):
            qp = graph.call_function(pad_s8, (q, tuple(widths), int(zp)))
            new = graph.call_function(DEQUANTIZE_PER_TENSOR, (qp,) + tuple(dq.args[1:]))
        for m, dt in ((qp, torch.int8), (new, torch.float32)):
            copy_meta(n, m)
            m.meta["val"] = _val(n.meta["val"].shape, dt)
            m.meta["custom"] = {"train_role": "forward"}
        n.replace_all_uses_with(new)
        graph.erase_node(n)


# what an int8 step may hold besides its int8 layers: ops whose C kernels are exact per
# element (or data movement), or whose summation order reference.py mirrors
_EXACT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default, aten.t.default,
    aten.expand.default, aten.slice.Tensor, aten.flatten.using_ints, aten.squeeze.dims, aten.unsqueeze.default,
    aten.clone.default, aten.alias.default, aten.detach.default, aten.transpose.int, aten.select.int,
    aten.cat.default,
    aten.relu.default, aten.hardtanh.default, aten.clamp.default, aten.round.default,
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Scalar, aten.div.Tensor, aten.mul.Scalar,
    aten.mean.dim, aten.sum.dim_IntList, aten.max_pool2d.default, aten.ones_like.default,
    aten._log_softmax.default, aten.nll_loss_forward.default, aten.nll_loss_backward.default,
    aten._log_softmax_backward_data.default, aten.threshold_backward.default, aten.hardtanh_backward.default,
    aten.sigmoid.default, aten.sigmoid_backward.default, aten.hardsigmoid_backward.default,   # reference.GATES
    aten.where.self, aten.scalar_tensor.default, aten.le.Scalar, aten.ge.Scalar, aten.lt.Scalar, aten.gt.Scalar,
    aten.convolution_backward.default, aten.slice_scatter.default, operator.getitem,
    QUANTIZE_PER_TENSOR, DEQUANTIZE_PER_TENSOR, DEQUANTIZE_PER_CHANNEL,
    ste_s8, mask_bits, masked_grad, linear_bwd_input, linear_bwd_weight, pad_s8, *PADS,
    float_linear,   # the float head's forward (float_head.py): gr_linear_tr_f32, mirrored by the reference
}


def inexact_ops(g: Graph) -> list[tuple[str, str, str]]:
    """(op, module path, reason) of every op the int8 step cannot compute bit for bit
    against its reference (a float conv or matmul, layer norm, softmax inside the model ...)."""
    layers = find(g)
    inside = {n for ql in layers.values() for n in (ql.layer, ql.act, *ql.post) if n is not None}
    out = []
    for n in g.gm.graph.nodes:
        if n.op != "call_function" or n in inside or n.target in _EXACT_OPS:
            continue
        if n.target in (aten.convolution.default, aten.linear.default, aten.addmm.default):
            what = ("a float conv/linear layer, or one whose output stays float (every conv/linear of an "
                    "int8 step must be int8, output included: quantize(mode=static,outputs=all))")
        else:
            what = "this op"
        out.append((op_name(n), module_path(n) or "<root>", f"{what}, which has no bit-exact integer reference "
                    "in an int8 training step; quantize it, or train in fp32"))
    return out


def _check_ops(g: Graph) -> None:
    """Refuse, naming the op, the first of ``inexact_ops``."""
    for op, path, why in inexact_ops(g)[:1]:
        raise Unsupported(f"int8 training step: {op} at {path} is {why}")


def _bit_masks(g: Graph) -> None:
    """Gradient masks of int8 layers as bits computed in the forward: ``ste_s8`` and the
    relu / hardtanh backward that read an int8 output q become ``masked_grad(g,
    mask_bits(q, ...))``, so the backward keeps n/8 bytes instead of q itself (q stays
    only where a weight gradient still reads it)."""
    graph = g.gm.graph
    made: dict[tuple, fx.Node] = {}
    inf = float("inf")

    def bits_for(q: fx.Node, qmin, qmax, scale, zp, lo, hi) -> fx.Node:
        key = (q, qmin, qmax, scale, zp, lo, hi)
        if key not in made:
            with graph.inserting_after(q):
                b = graph.call_function(mask_bits, (q, int(qmin), int(qmax), float(scale), int(zp), float(lo), float(hi)))
            copy_meta(q, b)
            b.meta["val"] = _val(q.meta["val"].shape, torch.bool)
            b.meta["custom"] = {"train_role": "forward"}
            made[key] = b
        return made[key]

    def replace(n: fx.Node, grad: fx.Node, bits: fx.Node) -> None:
        with graph.inserting_before(n):
            m = graph.call_function(masked_grad, (grad, bits))
        copy_meta(n, m, keep_val=True)
        m.meta["custom"] = {"train_role": "backward"}
        n.replace_all_uses_with(m)
        graph.erase_node(n)

    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in (aten.threshold_backward.default, aten.hardtanh_backward.default):
            continue
        g1, dq = n.args[0], n.args[1]
        if not (isinstance(dq, fx.Node) and dq.target == DEQUANTIZE_PER_TENSOR):
            continue
        q, scale, zp = dq.args[0], dq.args[1], dq.args[2]
        lo, hi = ((float(n.args[2]), inf) if n.target == aten.threshold_backward.default
                  else (float(n.args[2]), float(n.args[3])))
        qmin, qmax = -129, 128   # no quantizer range test unless a ste of the same q is folded in
        if isinstance(g1, fx.Node) and g1.target is ste_s8 and g1.args[1] is q and len(g1.users) == 1:
            g1, qmin, qmax = g1.args[0], g1.args[2], g1.args[3]
            ste_node = n.args[0]
            replace(n, g1, bits_for(q, qmin, qmax, scale, zp, lo, hi))
            graph.erase_node(ste_node)
        else:
            replace(n, g1, bits_for(q, qmin, qmax, scale, zp, lo, hi))
    for n in list(graph.nodes):  # a quantizer's mask alone
        if n.op == "call_function" and n.target is ste_s8:
            q = n.args[1]
            dq = next((u for u in q.users if u.target == DEQUANTIZE_PER_TENSOR), None)
            scale, zp = (float(dq.args[1]), int(dq.args[2])) if dq is not None else (1.0, 0)
            replace(n, n.args[0], bits_for(q, n.args[2], n.args[3], scale, zp, -inf, inf))


def _scale_before_expand(g: Graph) -> None:
    """``div(expand(v), k)`` (a mean's backward) -> ``expand(div(v, k))``: the same values,
    without a float tensor of the expanded size before the reader that needs it."""
    graph = g.gm.graph
    for n in list(graph.nodes):
        e = n.args[0] if n.op == "call_function" and n.target == aten.div.Scalar else None
        if not (isinstance(e, fx.Node) and e.target == aten.expand.default and len(e.users) == 1):
            continue
        src = e.args[0]
        with graph.inserting_before(n):
            d = graph.call_function(aten.div.Scalar, (src, n.args[1]))
            ex = graph.call_function(aten.expand.default, (d,) + tuple(e.args[1:]))
        copy_meta(n, d)
        d.meta["val"] = _val(src.meta["val"].shape, src.meta["val"].dtype)
        copy_meta(n, ex, keep_val=True)
        d.meta["custom"] = ex.meta["custom"] = dict(n.meta.get("custom", {}))
        n.replace_all_uses_with(ex)
        graph.erase_node(n)
        graph.erase_node(e)


def _int8_weights(g: Graph) -> None:
    """Forward conv/linear weights ``mul(w_q, s)`` -> ``dequantize_per_channel(<w>_i8, s)``."""
    graph = g.gm.graph
    made: dict[fx.Node, fx.Node] = {}
    for n in list(graph.nodes):
        if n.op != "call_function" or _role(n) == "backward":
            continue
        if n.target == aten.convolution.default:
            w_arg = n.args[1]
        elif n.target == aten.addmm.default:
            w_arg = n.args[2]
        elif n.target == aten.mm.default and float_param(n.args[1]) is not None:
            w_arg = n.args[1]   # a float head without bias
        else:
            continue
        sw = scaled_weight(w_arg)
        if sw is None:  # a float classifier head (float_head.py); any other float layer is refused
            rewrite_head(g, n)
            continue
        wq, s = sw
        if w_arg not in made:
            wq_t, s_t = g.attr(wq), g.attr(s)
            if not torch.equal(wq_t, wq_t.round()) or wq_t.abs().max() > 127:
                raise Unsupported(f"{wq.target} holds values off the int8 grid")
            first = next(iter(graph.nodes))
            i8 = g.add_attr(f"{wq.target}_i8", wq_t.detach().to(torch.int8), before=first, parameter=False)
            sc = g.add_attr(f"{wq.target}_i8scale", s_t.detach().reshape(-1).float(), before=first,
                            parameter=False)
            zp = g.add_attr(f"{wq.target}_i8zp", torch.zeros(s_t.numel(), dtype=torch.int64), before=first,
                            parameter=False)
            g.meta.setdefault("int8_train", {}).setdefault("weights", {})[str(i8.target)] = str(wq.target)
            with graph.inserting_before(n):
                dq = graph.call_function(DEQUANTIZE_PER_CHANNEL, (i8, sc, zp, 0, -127, 127, torch.int8))
            copy_meta(n, dq)
            dq.meta["val"] = _val(wq_t.shape, torch.float32)
            dq.meta["custom"] = {"train_role": "forward"}
            made[w_arg] = dq
        dq = made[w_arg]
        if n.target == aten.convolution.default:
            n.replace_input_with(w_arg, dq)
            continue
        if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
            raise Unsupported(f"{n.name}: addmm with alpha/beta")
        bias, x = n.args[0], n.args[1]
        with graph.inserting_before(n):
            lin = graph.call_function(aten.linear.default, (x, dq, bias))
        copy_meta(n, lin, keep_val=True)
        lin.meta["custom"] = dict(n.meta.get("custom", {}))
        n.replace_all_uses_with(lin)
        graph.erase_node(n)


def _linear_backward(g: Graph) -> None:
    """``mm(g, t(permute(mul(w_q, s))))`` -> linear_bwd_input; ``mm(t(g), x)`` -> linear_bwd_weight."""
    graph = g.gm.graph
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target != aten.mm.default or _role(n) != "backward":
            continue
        a, b = n.args
        if scaled_weight(b) is not None:
            w = b
            while w.target in VIEWS:
                w = w.args[0]
            new_args, fn = (a, w), linear_bwd_input
        elif head_weight(g, b) is not None:   # through the float head's float weight
            new_args, fn = (a, head_weight(g, b)), linear_bwd_input
        elif isinstance(a, fx.Node) and a.target == aten.t.default:
            new_args, fn = (a.args[0], b), linear_bwd_weight
        else:
            raise Unsupported(f"{n.name}: a backward matmul that is not a linear layer's")
        with graph.inserting_before(n):
            new = graph.call_function(fn, new_args)
        copy_meta(n, new, keep_val=True)
        new.meta["custom"] = dict(n.meta.get("custom", {}))
        n.replace_all_uses_with(new)
        graph.erase_node(n)
