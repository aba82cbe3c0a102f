"""A float classifier head in an int8 training step (``quantize(mode=static,exclude=<head>)``).

The backbone keeps int8 weights and activations (``device_form``); the last linear layer,
whose logits the loss reads, keeps its fp32 weight and bias, trained by plain SGD in
float as the fp32 step trains them. Its logits are float (no int8 clamp). The device form
gives its forward as ``float_linear`` (``gr_linear_tr_f32``: the bias, then the products in
input order, never fused into an FMA, so the host build, the Cortex-M build and the
reference agree bit for bit) and its backward as ``linear_bwd_input`` / ``linear_bwd_weight``
on a float weight / input (``gr_linear_bwd_input_f32`` / ``gr_linear_bwd_weight_f32``,
whose summation orders ``reference.lin_bwd_*`` already mirror). A float layer anywhere
else (its output read by another layer) is refused, named.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ....rewrite.graph import copy_meta, module_path
from ..inference.lowering.base import Unsupported

aten = torch.ops.aten
VIEWS = (aten.t.default, aten.permute.default)
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
            aten.clone.default, aten.alias.default, aten.detach.default)
QUANTIZE_IT = "quantize it too (take it out of quantize's exclude), or train in fp32"


def float_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """y = x w^T + b with a float weight (out x in): the int8 step's float head."""
    return torch.nn.functional.linear(x, w, b)


def float_param(node) -> fx.Node | None:
    """The float parameter (``get_attr``) behind t/permute views, or None."""
    while isinstance(node, fx.Node) and node.target in VIEWS:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _role(n: fx.Node) -> str | None:
    return n.meta.get("custom", {}).get("train_role")


def _only_loss_reads(n: fx.Node) -> bool:
    """Whether ``n``'s forward value reaches nothing but the loss (through reshapes)."""
    todo = [n]
    while todo:
        for u in todo.pop().users:
            if _role(u) in ("loss", "backward", "update"):
                continue
            if u.op == "call_function" and u.target in RESHAPES:
                todo.append(u)
                continue
            return False
    return True


def refuse(n: fx.Node, what: str, advice: str | None = None) -> Unsupported:
    advice = advice or ("only the classifier (the last linear layer, whose logits the loss reads) may stay "
                        f"float in an int8 training step: {QUANTIZE_IT}")
    return Unsupported(f"{n.name} at {module_path(n) or '<root>'} is {what}; {advice}")


def rewrite_head(g, n: fx.Node) -> fx.Node:
    """The forward ``addmm(b, x, t(w))`` (``mm(x, t(w))``) of the float head ->
    ``float_linear(x, w, b)`` (b None);
    returns the weight's ``get_attr``. Anything else with a float weight is refused."""
    graph = g.gm.graph
    if n.target == aten.convolution.default:
        raise refuse(n, "a float convolution inside the int8 backbone")
    if n.target == aten.mm.default:   # no bias
        x, w, b = n.args[0], float_param(n.args[1]), None
    else:
        x, w, b = n.args[1], float_param(n.args[2]), n.args[0]
    if w is None or not (b is None or isinstance(b, fx.Node) and b.op == "get_attr"):
        raise refuse(n, "a linear layer whose weight is neither int8 nor a float parameter")
    if not _only_loss_reads(n):
        raise refuse(n, "a float linear layer inside the int8 backbone (other layers read its output)")
    if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
        raise Unsupported(f"{n.name}: addmm with alpha/beta")
    info = _param_info(g, w)
    if info is not None and info.get("trained") and info.get("rows") is not None \
            and info["rows"] < int(g.attr(w).shape[0]):
        raise refuse(n, "a partially trained float classifier", "a float head is trained whole: give it "
                        "ratio 1 in sparse-update's weights ('-1:1'), or quantize it")
    with graph.inserting_before(n):
        lin = graph.call_function(float_linear, (x, w, b))
    copy_meta(n, lin, keep_val=True)
    lin.meta["custom"] = dict(n.meta.get("custom", {}))
    n.replace_all_uses_with(lin)
    graph.erase_node(n)
    g.meta.setdefault("int8_train", {}).setdefault("float_head", []).append(str(w.target))
    return w


def _param_info(g, attr: fx.Node) -> dict | None:
    return next((info for info in g.meta["train_step"]["params"].values() if info["attr"] == str(attr.target)),
                None)


def head_weight(g, node) -> fx.Node | None:
    """The float head's weight behind a backward matmul operand (views of it), or None."""
    w = float_param(node)
    return w if w is not None and str(w.target) in g.meta.get("int8_train", {}).get("float_head", ()) else None
