"""Static int8 post-training quantization, lowered as QDQ (see the package docstring).

Per layer: the input activation gets a quantize/dequantize pair with per-tensor affine
parameters from an observer over the calibration data (reused when the input already
comes from a dequantize, e.g. the previous quantized layer's output); the weight is
stored as per-channel symmetric int8 fed through ``dequantize_per_channel``; the output
(after a directly following ReLU/ReLU6, so the int8 kernel can fuse it) gets its own
quantize/dequantize pair unless every reader computes in float (``outputs=auto``, the
default; ``float_readers_only``). Bias stays fp32.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from ...rewrite.graph import Graph, copy_meta
from ...rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_TENSOR
from .error_report import layer_error
from .layers import QLayer, layer_input, observe
from .observers import QMAX, QMIN, fake_quant, make_observer, qparams

aten = torch.ops.aten
W_QMAX = 127
_ADDS = (aten.add.Tensor, aten.add_.Tensor)
_ACTIVATIONS = (aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default,
                aten.hardtanh_.default)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 over [-127, 127]: (int8 weight, fp32 scales)."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    scale = flat.abs().amax(1) / W_QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(flat / scale[:, None]), -W_QMAX, W_QMAX).to(torch.int8)
    return q.reshape(w.shape), scale.to(torch.float32)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.reshape(-1, *([1] * (q.dim() - 1)))


def fused_activation(layer: QLayer) -> fx.Node | None:
    """A ReLU / ReLU6 that is the layer's only user (its output QDQ goes after it)."""
    users = list(layer.node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in _ACTIVATIONS:
        act = users[0]
        if act.target in (aten.hardtanh.default, aten.hardtanh_.default) and tuple(act.args[1:3]) not in ((0.0, 6.0), (0, 6)):
            return None
        return act
    return None


def _meta_like(node: fx.Node, dtype: torch.dtype) -> torch.Tensor | None:
    val = node.meta.get("val")
    return torch.empty(tuple(val.shape), dtype=dtype, device="meta") if isinstance(val, torch.Tensor) else None


def _insert_qdq(graph: Graph, value: fx.Node, scale: float, zp: int, provenance: fx.Node) -> fx.Node:
    with graph.graph.inserting_after(value):
        q = graph.graph.call_function(QUANTIZE_PER_TENSOR, (value, scale, zp, QMIN, QMAX, torch.int8))
    with graph.graph.inserting_after(q):
        dq = graph.graph.call_function(DEQUANTIZE_PER_TENSOR, (q, scale, zp, QMIN, QMAX, torch.int8))
    for node, dtype in ((q, torch.int8), (dq, torch.float32)):
        copy_meta(provenance, node)
        node.meta["val"] = _meta_like(value, dtype)
    return dq


def resolve(graph: Graph, arg: Any) -> Any:
    """A node argument as a value: get_attr -> its tensor; other constants as they are."""
    if isinstance(arg, fx.Node):
        return graph.attr(arg)
    return arg


def run_layer(graph: Graph, layer: QLayer, x: torch.Tensor, w: torch.Tensor,
              act: fx.Node | None) -> torch.Tensor:
    """The layer (and its fused activation) on a recorded input with weight ``w``."""
    args = [resolve(graph, a) for a in layer.args_with(x, w)]
    y = layer.node.target(*args, **layer.node.kwargs)
    if act is not None:
        y = act.target(y, *act.args[1:], **act.kwargs)
    return y


def quantize_static(graph: Graph, layers: Sequence[QLayer], samples: Sequence[tuple], *,
                    observer: str, percentile: float, progress=None, keep_inputs: int = 4,
                    max_error: float = 0.0, outputs: str = "auto",
                    bias_correction: bool = False) -> tuple[list[dict], dict[str, list[tuple]], dict[str, int], list[dict]]:
    """Calibrate, then rewrite every layer in place. Returns per-layer records; per layer
    path, (float input, float output, quantized output) triples for the error report; how
    often each rewrite fired; and the layers left float because their output error on the
    recorded calibration inputs (relative L2, input and output fake-quantized, int8
    weights) exceeded ``max_error`` (0: none are). ``outputs="auto"`` leaves a layer's
    output float where every reader computes in float (``float_readers_only``; the backends
    run it int8 with a float output); ``"all"`` quantizes every output. ``bias_correction``:
    each conv's bias absorbs the mean shift quantization puts on its output
    (``correct_bias``). Convs only: on the peers benchmark's held-out data it took the
    output change of MobileNetV2-1.0 @224 from 0.0141 to 0.0080 and of MobileNetV2-w0.35
    @128 (batch 8) from 0.0217 to 0.0181, while correcting MiniLM's 37 linears moved its
    output change from 0.0871 to 0.0933 (per-token activations vary too much for one mean
    shift per channel)."""
    acts = {l.param: fused_activation(l) for l in layers}
    observers: dict[fx.Node, Any] = {}
    recorded: dict[str, list[torch.Tensor]] = {l.param: [] for l in layers}
    watch = {}

    def track(node: fx.Node, keep: str | None = None):
        first = node not in observers
        obs = observers.setdefault(node, make_observer(observer, percentile))

        def fn(value, keep=keep):
            if first:                           # one update per value, however many uses
                obs.update(value)
            if keep is not None and len(recorded[keep]) < keep_inputs:
                recorded[keep].append(value.detach().clone())
        prev = watch.get(node)
        watch[node] = (lambda v, a=prev, b=fn: (a(v), b(v))) if prev else fn

    inputs = {l.param: layer_input(l) for l in layers}   # before any rewrite
    float_out = {l.param for l in layers
                 if outputs == "auto" and float_readers_only(acts[l.param] or l.node, layers, acts)}
    for l in layers:
        track(inputs[l.param], keep=l.param)
        track(acts[l.param] or l.node)
    observe(graph, samples, watch, progress, "calibrating int8 observers")
    ranges = {node: qparams(*obs.range()) for node, obs in observers.items()}

    records, pairs = [], {}
    fired = {"input-qdq": 0, "input-reused": 0, "weight-int8": 0, "output-qdq": 0, "output-float": 0,
             "add-output-reused": 0, **({"bias-corrected": 0} if bias_correction else {})}
    fallback = []
    for l in layers:
        x_node, act = layer_input(l), acts[l.param]    # x_node: the input as rewritten so far
        out_node = act or l.node
        in_s, in_zp = ranges[inputs[l.param]]
        out_s, out_zp = ranges[out_node]
        w = graph.attr(l.weight_node)
        q, scale = quantize_weight(w)
        # reference outputs before the graph changes
        w_dq = dequantize_weight(q, scale)
        if bias_correction and l.kind == "conv" and correct_bias(graph, l, recorded[l.param], w, w_dq, in_s, in_zp):
            fired["bias-corrected"] += 1
        with torch.no_grad():
            out_fq = (lambda y: y) if l.param in float_out else (lambda y: fake_quant(y, out_s, out_zp))
            pairs[l.path] = [(x, run_layer(graph, l, x, w, act),
                              out_fq(run_layer(graph, l, fake_quant(x, in_s, in_zp), w_dq, act)))
                             for x in recorded[l.param]]
        if max_error > 0:
            err = layer_error([(yf, yq) for _, yf, yq in pairs[l.path]])
            if err["relative_error"] > max_error:
                fallback.append({"path": l.path, "kind": l.kind, "relative_error": err["relative_error"],
                                 "sqnr_db": err["sqnr_db"], "threshold": max_error})
                del pairs[l.path]
                continue

        if x_node.op == "call_function" and x_node.target == DEQUANTIZE_PER_TENSOR:
            x_dq = x_node                       # already quantized upstream
            fired["input-reused"] += 1
            in_s, in_zp = float(x_node.args[1]), int(x_node.args[2])
        else:
            existing = next((u for u in x_node.users if u.target == QUANTIZE_PER_TENSOR), None)
            x_dq = next(iter(existing.users)) if existing is not None else \
                _insert_qdq(graph, x_node, in_s, in_zp, l.node)
            fired["input-reused" if existing is not None else "input-qdq"] += 1
            in_s, in_zp = float(x_dq.args[1]), int(x_dq.args[2])
        wq_node = graph.add_attr(f"{l.param}_int8", q, before=l.node, parameter=False)
        s_node = graph.add_attr(f"{l.param}_scale", scale, before=l.node, parameter=False)
        z_node = graph.add_attr(f"{l.param}_zero_point", torch.zeros(len(scale), dtype=torch.int64),
                                before=l.node, parameter=False)
        with graph.graph.inserting_before(l.node):
            w_dq_node = graph.graph.call_function(
                DEQUANTIZE_PER_CHANNEL, (wq_node, s_node, z_node, 0, -W_QMAX, W_QMAX, torch.int8))
        copy_meta(l.node, w_dq_node)
        w_dq_node.meta["val"] = _meta_like(l.weight_node, torch.float32)
        l.node.args = l.args_with(x_dq, w_dq_node)
        fired["weight-int8"] += 1
        if l.param in float_out:
            fired["output-float"] += 1
            out_s = out_zp = None
        else:
            users = list(out_node.users)
            dq = _insert_qdq(graph, out_node, out_s, out_zp, l.node)
            for u in users:
                u.replace_input_with(out_node, dq)
            fired["output-qdq"] += 1
        l.node.meta.setdefault("gradrewrite", {}).update({"quantized": "int8 static"})
        numel, channels = w.numel(), len(scale)
        records.append({
            "path": l.path, "weight": l.param, "kind": l.kind, "shape": list(w.shape),
            "input": {"scale": in_s, "zero_point": in_zp},
            "output": {"scale": out_s, "zero_point": out_zp,
                       "after": act.target.__name__.split(".")[0] if act is not None else None},
            # stored: int8 codes, fp32 scale and int64 zero point per channel (bias not counted)
            "bits_per_weight": round((8 * numel + (32 + 64) * channels) / numel, 4)})
    fired["add-output-reused"] = quantized_adds(graph)
    graph.commit()
    return records, pairs, fired, fallback


def correct_bias(graph: Graph, layer: QLayer, xs: Sequence[torch.Tensor], w: torch.Tensor,
                 w_dq: torch.Tensor, in_s: float, in_zp: int) -> bool:
    """Bias correction (as NNCF's fast bias correction, Nagel et al. 2019's empirical
    form): on the recorded calibration inputs, the per-output-channel mean of
    ``layer(x, w) - layer(fake_quant(x), w_dq)`` (before any fused activation) is added
    to the layer's stored bias, so the int8 layer's output is unbiased on that data.
    False when the layer has no stored bias of its own (nothing changes)."""
    b = layer.node.args[2] if len(layer.node.args) > 2 else None
    if not xs or not (isinstance(b, fx.Node) and b.op == "get_attr") or len(b.users) != 1:
        return False
    bias = graph.attr(b)
    channel = 1 if layer.kind == "conv" else -1
    with torch.no_grad():
        total = torch.zeros(bias.shape, dtype=torch.float64)
        for x in xs:
            d = (run_layer(graph, layer, x, w, None)
                 - run_layer(graph, layer, fake_quant(x, in_s, in_zp), w_dq, None)).double()
            d = d.movedim(channel, 0).reshape(d.shape[channel], -1)
            total += d.mean(1)
        graph.set_attr(b, (bias.double() + total / len(xs)).to(bias.dtype))
    return True


# readers that compute in float whatever they are given (a quantized output before them is
# only rounding): norms, attention, smooth activations; data movement is followed through
_FLOAT_READERS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.gelu.default,
                  aten.softmax.int, aten._softmax.default, aten.scaled_dot_product_attention.default,
                  aten.matmul.default, aten.bmm.default, aten.rms_norm.default}
_MOVES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
          aten.permute.default, aten.contiguous.default, aten.clone.default, aten.dropout.default,
          aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor, aten.unsqueeze.default,
          aten.squeeze.dim, aten.alias.default, aten.detach.default, aten.chunk.default,
          aten.unbind.int, aten.select.int, aten.expand.default, aten.flatten.using_ints,
          aten.unflatten.int, operator.getitem}


def float_readers_only(value: fx.Node, layers: Sequence[QLayer], acts: dict, depth: int = 8) -> bool:
    """True when every reader of a layer's output computes in float (LayerNorm, GELU,
    attention, a residual add with a float operand, through data movement): a quantize/
    dequantize pair there adds rounding and no integer kernel can use it (ORT runs the layer
    as int8 x int8 with a float output, the mcu and tvm backends as
    ``int8_layers.match_float_output``). Graph outputs, quantized layers, pools, adds of
    two layer outputs and every op not known here keep the pair (the graph contract)."""
    outs = {acts[l.param] or l.node for l in layers}
    readers = list(value.users)
    if not readers or depth <= 0:
        return False
    for u in readers:
        if u.op != "call_function":
            return False
        if u.target in _FLOAT_READERS:
            continue
        if u.target in _MOVES:
            if float_readers_only(u, layers, acts, depth - 1):
                continue
            return False
        if u.target in _ADDS:
            other = [a for a in u.args if isinstance(a, fx.Node) and a is not value]
            if other and not all(_int8_able(a, outs) for a in other):
                continue
        return False
    return True


# ops some backend runs on int8 tensors (the mcu backend's int8 elementwise kernels: tables
# for these activations, average pools, SE multiplies, concat, pad): their results may be
# quantized values, so a residual add with one keeps its quantize/dequantize pairs
_INT8_UNARY = {aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default,
               aten.sigmoid.default, aten.silu.default, aten.silu_.default, aten.tanh.default,
               aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default,
               aten.mean.dim, aten.pad.default, aten.constant_pad_nd.default, aten.max_pool2d.default,
               aten.max_pool2d_with_indices.default}
_INT8_NARY = {aten.mul.Tensor, aten.mul_.Tensor, aten.cat.default}


def _int8_able(node: Any, outs: set, depth: int = 16) -> bool:
    """Could ``node`` hold a quantized value: a quantized layer's output, a graph input (a
    first layer quantizes it), or an add / multiply / concat / activation / pool / pad /
    data movement of such values. A norm's or an embedding's output, and sums with them,
    cannot."""
    if not isinstance(node, fx.Node) or depth <= 0:
        return False
    if node in outs or node.op == "placeholder":
        return True
    if node.op != "call_function":
        return False
    if node.target in _ADDS or node.target in _INT8_NARY:
        return all(_int8_able(a, outs, depth - 1) for a in _tensor_args(node))
    if node.target in _ACTIVATIONS or node.target in _MOVES or node.target in _INT8_UNARY:
        return _int8_able(node.args[0], outs, depth - 1)
    return False


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    """The tensor operands of an add, a multiply or a concat (its list of tensors)."""
    args = node.args[0] if node.target == aten.cat.default else node.args
    return [a for a in args if isinstance(a, fx.Node)]


def _dequantized(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target == DEQUANTIZE_PER_TENSOR


def quantized_adds(graph: Graph) -> int:
    """Residual adds of two quantized values whose sum is quantized for a later layer:
    every other reader of the sum reads it through that quantize/dequantize too.

    ``x2 = x1 + f(x1)`` chains (MobileNetV2, ResNet stages) left the next add reading the
    float ``x1`` while the next layer read ``dequantize(quantize(x1))``: the first add had
    a float reader, so no integer kernel could take it, and the second a float input.
    Reading the quantized sum (one rounding, the range calibrated for the next layer's
    input) makes each add ``quantize(add(dequantize(a), dequantize(b)))``: an integer add
    (ORT QLinearAdd, the mcu/tvm int8 add). Returns how many adds were rerouted."""
    count = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs:
            continue
        if not all(_dequantized(a) for a in node.args):
            continue
        out = node
        users = list(out.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target in _ACTIVATIONS:
            out = users[0]
            users = list(out.users)
        q = next((u for u in users if u.op == "call_function" and u.target == QUANTIZE_PER_TENSOR
                  and u.args[5] == torch.int8 and len(u.users) == 1), None)
        dq = next(iter(q.users)) if q is not None else None
        if dq is None or dq.target != DEQUANTIZE_PER_TENSOR:
            continue
        others = [u for u in users if u is not q]
        if not others:
            continue
        for u in others:
            u.replace_input_with(out, dq)
        count += 1
    return count


__all__ = ["quantize_static", "correct_bias", "quantize_weight", "dequantize_weight", "run_layer", "resolve",
           "fused_activation"]
