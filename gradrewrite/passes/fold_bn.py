"""fold-bn: fold inference batch norm into the convolution or linear layer before it.

conv(x, W, b) -> bn(gamma, beta, mean, var, eps) becomes conv(x, W', b') with
s = gamma / sqrt(var + eps), W' = W * s (per output channel), b' = (b - mean) * s + beta.
Computed in float64, stored in the weight's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..rewrite.graph import Graph, copy_meta, module_path, tensor_meta
from ..rewrite.registry import PassContext, PassResult, register_pass
from ..rewrite.rules import Match, Op, Rule, Var, Weight, apply_rules
from ..rewrite.selectors import Selector

aten = torch.ops.aten
_CONV_ND = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


def _bn_pattern(producer: str) -> Op:
    return Op(aten.batch_norm.default,
              Op(producer, Var("x"), Weight("w"), Weight("b", optional=True),
                 name="layer", single_use=True),
              Weight("gamma", optional=True), Weight("beta", optional=True),
              Weight("mean"), Weight("var"), Var("training"), Var("momentum"), Var("eps"),
              name="bn")


def _check(graph: Graph, m: Match) -> str | None:
    if m["training"]:
        return "batch norm in training mode"
    layer = m["layer"]
    if layer.target == aten.convolution.default and layer.args[6]:
        return "transposed convolution"
    if layer.target == aten.linear.default:
        shape, _ = tensor_meta(layer)
        if shape is None or len(shape) != 2:
            return "linear output is not 2-D, so batch norm does not normalise its features"
    for key in ("w", "gamma", "beta", "mean", "var"):
        if m.get(key) is not None and len(m[key].users) > 1:
            return f"{key} is shared with another layer"
    return None


def _rewrite(graph: Graph, m: Match):
    layer, bn = m["layer"], m["bn"]
    w = graph.attr(m["w"]).detach().double()
    out_ch = w.shape[0]
    mean = graph.attr(m["mean"]).detach().double()
    var = graph.attr(m["var"]).detach().double()
    gamma = graph.attr(m["gamma"]).detach().double() if m["gamma"] is not None else torch.ones(out_ch, dtype=torch.float64)
    beta = graph.attr(m["beta"]).detach().double() if m["beta"] is not None else torch.zeros(out_ch, dtype=torch.float64)
    bias = graph.attr(m["b"]).detach().double() if m["b"] is not None else torch.zeros(out_ch, dtype=torch.float64)
    scale = gamma / torch.sqrt(var + float(m["eps"]))
    new_w = (w * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(graph.attr(m["w"]).dtype)
    new_b = ((bias - mean) * scale + beta).to(graph.attr(m["w"]).dtype)

    # _check made sure W (and b) feed only this layer, so they are replaced under
    # their own names; a conv without bias gets a new one.
    graph.set_attr(m["w"], new_w)
    w_node = m["w"]
    if m["b"] is not None and len(m["b"].users) == 1:
        graph.set_attr(m["b"], new_b)
        b_node = m["b"]
    else:
        path = module_path(m["w"])
        b_node = graph.add_attr(f"{path}.bias" if path else "bias", new_b, before=layer)
    args = list(layer.args) + [None] * max(0, 3 - len(layer.args))  # conv2d(x, w) has no bias slot
    args[1], args[2] = w_node, b_node
    new = graph.graph.call_function(layer.target, tuple(args), dict(layer.kwargs))
    copy_meta(layer, new)
    new.meta["val"] = bn.meta.get("val", layer.meta.get("val"))
    new.meta.setdefault("gradrewrite", {})["folded_bn"] = module_path(bn)
    return new


_RULES = [
    Rule("fold-bn-into-conv", _bn_pattern("conv"), _rewrite, _check,
         doc="batch_norm(conv(x, W, b)) -> conv(x, W*s, (b-mean)*s+beta)"),
    Rule("fold-bn-into-linear", _bn_pattern("linear"), _rewrite, _check,
         doc="batch_norm(linear(x, W, b)) on 2-D features -> linear(x, W*s, ...)"),
]


@register_pass("fold-bn", requires=("eval-mode",))
@dataclass(frozen=True)
class FoldBatchNorm:
    """Fold eval-mode batch norm into the preceding conv/linear."""

    select: str = field(default="op:batch_norm",
                        metadata={"help": "which batch norms to fold (selector)"})
    exact = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        bns = graph.call_nodes()
        if not any(n.target == aten.batch_norm.default for n in bns):
            return PassResult(False, {"folded": 0, "note": "no batch norm in the graph"})
        chosen = set(Selector.parse(self.select).select(graph, what="fold-bn"))
        stats = apply_rules(graph, _RULES, only=lambda n: n in chosen)
        remaining = [module_path(n) for n in graph.call_nodes() if n.target == aten.batch_norm.default]
        report = {"folded": stats.total(), **stats.as_report(), "unfolded": remaining}
        return PassResult(stats.total() > 0, report)
