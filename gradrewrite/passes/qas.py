"""qas: Quantization-Aware Scaling of gradients for int8-stored weights.

On-Device Training Under 256KB Memory: a weight stored as ``W_q`` with scale ``s``
(``W = s * W_q``) gets the gradient ``G_Wq = s * G_W``; updating ``W_q`` with it moves
``W`` by ``s^2`` times what fp32 SGD would. QAS rescales ``G~_Wq = G_Wq * s^-2`` (and
the bias, stored with scale ``s_b = s_W * s_x``, by ``s_b^-2``) so int8 training
follows fp32 training.

Graph form this pass recognises: a trained parameter ``P`` whose forward use is
``mul(P, S)`` with ``S`` a per-channel scale buffer. Two ways to get there:

- ``trainable_int8(graph)`` converts the ``quantize`` pass's static int8 graph (int8
  ``<w>_int8`` + ``<w>_scale`` -> ``dequantize_per_channel``; activation q/dq pairs) into
  that form: the integers move into a float parameter ``<w>_q`` (an int8 tensor has no
  gradient), activations become ``fake_quantize_per_tensor_affine`` (straight-through);
  the graph computes exactly what the int8 graph computes. Its biases are fp32, so only
  weights are rescaled.
- ``int8_weights(model, example)`` builds such a model directly, with int-stored biases
  too (scale ``s_W * s_x``), for the bias half of QAS.

``round_int8`` puts trained values back on the integer grid after each step.
``logit_headroom`` widens the output (logit) quantizer's calibrated range by a factor
when a static int8 graph is captured as a training step (``Train.logit_headroom``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..rewrite.graph import Graph, copy_meta
from ..rewrite.registry import PassContext, PassResult, register_pass
from ..rewrite.train_step import dead_code, emit_update, rebuild_outputs, role

aten = torch.ops.aten


def scale_of(graph: Graph, weight: fx.Node) -> fx.Node | None:
    for user in weight.users:
        if user.target == aten.mul.Tensor and role(user) == "forward":
            other = user.args[1] if user.args[0] is weight else user.args[0]
            if isinstance(other, fx.Node) and other.op == "get_attr":
                return other
    return None


@register_pass("qas", requires=("training-step",))
@dataclass(frozen=True)
class QAS:
    """Quantization-Aware Scaling: gradients of int8-stored weights/biases times s^-2.

    ``rounding`` (nearest | stochastic) and ``seed`` say how a device that stores the
    integers rounds each update (the mcu backend's int8 training step; the torch graph
    itself keeps the unrounded update)."""

    rounding: str = field(default="nearest", metadata={
        "help": "how the device rounds int8 updates: nearest | stochastic"})
    seed: int = field(default=0, metadata={"help": "seed of the stochastic rounding's random stream"})
    exact = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.rounding not in ("nearest", "stochastic"):
            raise ConfigError(f"qas rounding {self.rounding!r} is not nearest or stochastic",
                              "use qas(rounding=nearest) or qas(rounding=stochastic)")
        ts = graph.meta["train_step"]
        ts["qas"] = {"rounding": self.rounding, "seed": int(self.seed)}
        nodes = {n.name: n for n in graph.graph.nodes}
        attrs = {str(n.target): n for n in graph.graph.nodes if n.op == "get_attr"}
        scaled = {}
        for path, info in ts["params"].items():
            if not info["trained"]:
                continue
            scale_node = scale_of(graph, attrs[info["attr"]])
            if scale_node is None:
                continue
            grad = nodes[info["grad"]]
            s = graph.attr(scale_node)
            rows = info.get("rows")
            factor = s.reshape(s.shape[0], *[1] * (grad.meta["val"].dim() - 1)) ** -2
            if rows:
                factor = factor[:rows]
            fnode = graph.add_attr(f"{info['attr']}_qas", factor, before=grad.next, parameter=False)
            fnode.meta["custom"] = {"train_role": "weight"}
            with graph.graph.inserting_after(fnode):
                g2 = graph.graph.call_function(aten.mul.Tensor, (grad, fnode))
            copy_meta(grad, g2, keep_val=True)
            g2.meta["custom"] = {"train_role": "backward"}
            g2.meta["param"] = path
            g2._rename(f"{path.replace('.', '_')}_grad_qas")
            # the integers stay integers: rounded (nearest) and saturated, as the device stores them
            emit_update(graph, path, g2, rows=rows,
                        saturate=(-(2 ** 31), 2 ** 31 - 1) if path.endswith("bias_q") else (-127, 127))
            scaled[path] = {"scale_min": float(s.min()), "scale_max": float(s.max())}
        if not scaled:
            raise ConfigError("qas found no trained int8-stored weight (a parameter used as "
                              "weight * per-channel scale)",
                              "quantize before the training passes, e.g. -p \"fold-bn,quantize(mode=static),"
                              "sparse-update(...),qas\" --calib FILE (from Python: "
                              "gradrewrite.passes.qas.int8_weights), and keep some int8 weights trained")
        rebuild_outputs(graph)
        dead_code(graph)
        report = {"scaled_params": scaled, "rounding": self.rounding}
        if ts.get("sparse_update", {}).get("reorder"):  # the new updates too: right after their gradients
            from .sparse_update.reorder import reorder_updates
            report["reordered_ops"] = reorder_updates(graph)
        graph.commit()
        return PassResult(True, report)


# ---------------------------------------------------------------- int8-stored weights
class _Int8Weights(nn.Module):
    """Wraps a conv/linear: weight = weight_q * weight_scale (per output channel),
    bias = bias_q * bias_scale with bias_scale = weight_scale * input_scale."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, input_scale: float):
        super().__init__()
        self.layer_type = type(layer)
        w = layer.weight.detach()
        s = w.reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-8) / 127
        shape = (-1,) + (1,) * (w.dim() - 1)
        self.weight_q = nn.Parameter(torch.round(w / s.reshape(shape)).clamp(-127, 127))
        self.register_buffer("weight_scale", s.reshape(shape).clone())
        if layer.bias is not None:
            sb = s * input_scale
            self.bias_q = nn.Parameter(torch.round(layer.bias.detach() / sb))
            self.register_buffer("bias_scale", sb.clone())
        else:
            self.bias_q = None
        self.conf = {k: getattr(layer, k) for k in ("stride", "padding", "dilation", "groups")
                     if hasattr(layer, k)}

    def forward(self, x):
        w = self.weight_q * self.weight_scale
        b = self.bias_q * self.bias_scale if self.bias_q is not None else None
        if self.layer_type is nn.Linear:
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, **self.conf)


def int8_weights(model: nn.Module, example: tuple[torch.Tensor, ...]) -> nn.Module:
    """A copy of ``model`` whose conv/linear weights are stored as int8 values (kept in
    float tensors so they are trainable) with per-channel fp32 scales; input scales for
    the biases come from one forward on ``example``."""
    model = copy.deepcopy(model).eval()
    absmax: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, name=name: absmax.__setitem__(name, float(inp[0].abs().max()))))
    with torch.no_grad():
        model(*example)
    for h in hooks:
        h.remove()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, _Int8Weights(mod, max(absmax.get(name, 1.0), 1e-8) / 127))
    return model


def round_int8(graph: Graph) -> None:
    """After a step: round trained int8-stored parameters back onto the int8 grid, as a
    device storing int8 does."""
    for path, info in graph.meta["train_step"]["params"].items():
        if info["trained"] and (path.endswith("weight_q") or path.endswith("bias_q")):
            owner_path, _, leaf = info["attr"].rpartition(".")
            owner = graph.gm.get_submodule(owner_path) if owner_path else graph.gm
            t = owner._parameters[leaf]
            lim = 127 if path.endswith("weight_q") else 2 ** 31 - 1
            owner._parameters[leaf] = nn.Parameter(torch.round(t.detach()).clamp(-lim, lim),
                                                   requires_grad=False)


def check_logit_headroom(factor: float) -> None:
    if not factor >= 1.0:
        raise ConfigError(f"logit_headroom {factor!r} is below 1",
                          "use 1 (the calibrated logit range) or more, e.g. 8")


def logit_headroom(graph: Graph, factor: float) -> dict | None:
    """Widen the range of the quantizer on a trainable int8 graph's output (the logits the
    loss reads) by ``factor``: its scale times ``factor``, the zero point kept, so the
    range is ``factor`` times the calibrated one (zero still exact). Static calibration
    sees the untrained model; a fresh classifier head's small logits give a narrow range
    that fine-tuning saturates (the clamped logits tie and the quantizer passes no
    gradient past them). In place; returns what changed, None when the output is not a
    per-tensor quantizer (a float head) or ``factor`` is 1."""
    check_logit_headroom(factor)
    out = next(n for n in graph.graph.nodes if n.op == "output").args[0]
    node = out[0] if isinstance(out, (tuple, list)) else out
    if factor == 1.0 or not (isinstance(node, fx.Node) and node.op == "call_function"
                             and node.target == aten.fake_quantize_per_tensor_affine.default):
        return None
    x, scale, zp, qmin, qmax = node.args[:5]
    node.args = (x, float(scale) * factor, int(zp), int(qmin), int(qmax), *node.args[5:])
    graph.commit()
    return {"factor": float(factor), "calibrated_scale": float(scale), "scale": float(scale) * factor,
            "zero_point": int(zp), "range": [(int(qmin) - int(zp)) * float(scale) * factor,
                                             (int(qmax) - int(zp)) * float(scale) * factor]}


def trainable_int8(graph: Graph) -> Graph:
    """The ``quantize`` pass's static int8 graph in a trainable form (a new Graph).

    Each int8 weight (``<w>_int8`` -> ``dequantize_per_channel``) becomes a float
    parameter ``<w>_q`` holding the same integers times a per-channel scale buffer
    ``<w>_qscale`` (``mul``), which ``qas`` recognises; each activation
    quantize/dequantize pair becomes ``fake_quantize_per_tensor_affine`` (same values,
    straight-through gradient inside the clamp range). fp32 biases stay fp32 (their
    update needs no QAS).
    """
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)

    qd = torch.ops.quantized_decomposed
    g = graph.clone()
    converted = 0
    for node in list(g.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == qd.dequantize_per_channel.default and node.args[0].op == "get_attr":
            w_node, s_node = node.args[0], node.args[1]
            w_int8, scales = g.attr(w_node), g.attr(s_node)
            axis = node.args[3]
            shape = [1] * w_int8.dim()
            shape[axis] = -1
            name = str(w_node.target).removesuffix("_int8")
            q = g.add_attr(f"{name}_q", w_int8.float(), before=node)
            s = g.add_attr(f"{name}_qscale", scales.float().reshape(shape), before=node, parameter=False)
            with g.graph.inserting_before(node):
                mul = g.graph.call_function(aten.mul.Tensor, (q, s))
            copy_meta(node, mul, keep_val=True)
            node.replace_all_uses_with(mul)
            g.graph.erase_node(node)
            converted += 1
        elif node.target == qd.dequantize_per_tensor.default and isinstance(node.args[0], fx.Node) \
                and node.args[0].target == qd.quantize_per_tensor.default:
            qnode = node.args[0]
            x, scale, zp, qmin, qmax = qnode.args[:5]
            with g.graph.inserting_before(node):
                fq = g.graph.call_function(aten.fake_quantize_per_tensor_affine.default,
                                           (x, float(scale), int(zp), int(qmin), int(qmax)))
            copy_meta(node, fq, keep_val=True)
            node.replace_all_uses_with(fq)
            g.graph.erase_node(node)
            if not qnode.users:
                g.graph.erase_node(qnode)
    if not converted:
        raise ConfigError("the graph has no int8 weights (dequantize_per_channel of an int8 buffer)",
                          "run the quantize pass (mode=static) first")
    for node in list(g.graph.nodes):  # quantize nodes shared by several dequantizes
        if node.op == "call_function" and node.target == qd.quantize_per_tensor.default and not node.users:
            g.graph.erase_node(node)
    g.commit()
    return g
