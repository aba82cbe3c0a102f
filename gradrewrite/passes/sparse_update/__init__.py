"""sparse-update: train only chosen biases and (partial) weights; prune the backward.

The Tiny Training Engine's sparse update (On-Device Training Under 256KB Memory) as a
pass over a training-step graph (``rewrite/train_step.py``): frozen parameters lose
their gradient computation, the backward stops below the earliest trained layer,
partial-channel layers compute the weight gradient of their first channels only, and
(``reorder=true``) each update runs right after its gradient so the gradient dies at
once. ``budget="256KB"`` searches a scheme under a planned-memory budget, planned by
the target backend's own planner (``search.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import ConfigError
from ...rewrite.graph import Graph
from ...rewrite.memory_plan import memory_report
from ...rewrite.registry import PassContext, PassResult, register_pass
from .config import Layer, Scheme, find_layers, parse_bytes, parse_scheme
from .prune import apply_scheme, backward_stop
from .reorder import reorder_updates
from ..qas import scale_of
from .search import _chosen, gradients, scheme_score, scores, search

__all__ = ["SparseUpdate", "Layer", "Scheme", "find_layers", "apply_scheme", "reorder_updates"]


@register_pass("sparse-update", requires=("training-step",))
@dataclass(frozen=True)
class SparseUpdate:
    """Sparse update (TTE): prune the backward to chosen biases/weights, reorder updates."""

    bias_last: int = field(default=0, metadata={"help": "update the biases of the last K layers"})
    biases: str = field(default="", metadata={"help": "also these layers' biases: PATH,PATH"})
    weights: str = field(default="", metadata={"help": "LAYER:RATIO,… (path or -N from the output)"})
    budget: str = field(default="", metadata={"help": "search a scheme under this SRAM budget, e.g. 256KB"})
    reorder: bool = field(default=True, metadata={"help": "apply each update right after its gradient"})
    max_calibration_batches: int = 8

    exact = False  # the step changes which parameters move

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not graph.meta.get("train_step"):
            raise ConfigError("sparse-update needs a training-step graph",
                              "compile with --train (or capture_train_step) first")
        layers = find_layers(graph)
        if not layers:
            raise ConfigError("the training step has no trainable conv/linear layer",
                              "sparse-update selects layers with weights")
        report: dict = {"layers": len(layers)}
        if self.budget:
            if self.bias_last or self.weights or self.biases:
                raise ConfigError("give either budget= or an explicit scheme, not both",
                                  "drop budget, or drop bias_last/biases/weights")
            budget = parse_bytes(self.budget)
            batches = list(_batches(graph, ctx))[: self.max_calibration_batches]
            qas = any(p.name == "qas" for p in ctx.following)  # int8 weights trained with QAS
            sc = scores(layers, gradients(graph, batches), graph.meta["train_step"]["optimizer"]["lr"],
                        _row_scales(graph, layers) if qas else None)
            scheme, trials, found = search(graph, layers, budget, sc, ctx.plan_memory, progress=ctx.info)
            chosen = _chosen(scheme, layers)
            report.update(budget_bytes=budget, contribution_scores=sc, search_trials=trials,
                          score_proxy="lr*||g||^2 on the calibration data "
                                      f"({len(batches)} batches)" + (", int8 weights' rows / s^2 (qas)"
                                                                     if qas else ""),
                          scheme_score=scheme_score(scheme, layers, sc), search=found)
        else:
            scheme, chosen = parse_scheme(self.bias_last, self.weights, layers, self.biases)
        report["scheme"] = scheme.text()
        report.update(apply_scheme(graph, chosen, layers))
        if self.reorder:
            report["reordered_ops"] = reorder_updates(graph)
        report["backward_stops_at"] = backward_stop(graph, layers)
        # the target's plan of the scheme found (as compiled, after the passes that follow)
        report["memory"] = found["plan"] if self.budget else memory_report(graph)
        graph.meta["train_step"]["sparse_update"] = {"scheme": scheme.text(), "reorder": self.reorder}
        return PassResult(True, report)


def _row_scales(graph: Graph, layers) -> dict[str, torch.Tensor]:
    """Per-row scale of each int8-stored weight (``mul(w_q, s)``, what qas rescales by)."""
    params = graph.meta["train_step"]["params"]
    attrs = {str(n.target): n for n in graph.graph.nodes if n.op == "get_attr"}
    out = {}
    for l in layers:
        node = attrs.get(params[l.weight]["attr"])
        s = scale_of(graph, node) if node is not None else None
        if s is not None:
            out[l.weight] = graph.attr(s).reshape(-1)
    return out


def _batches(graph: Graph, ctx: PassContext):
    """Calibration batches must be (inputs..., labels) like the step's own inputs; batches
    of the inputs alone (``--calib`` of the model's inputs, as quantize reads it) get
    seeded random labels; any other calibration data falls back to the example."""
    if ctx.calibration is None:
        return [graph.example_inputs]
    batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in ctx.calibration]
    shapes = [tuple(s.shape) for s in graph.inputs]  # the step is captured at fixed shapes

    def fits(b, shapes) -> bool:
        return len(b) == len(shapes) and all(isinstance(t, torch.Tensor) and tuple(t.shape) == sh
                                             for t, sh in zip(b, shapes))

    if all(fits(b, shapes) for b in batches):
        return batches
    if all(fits(b, shapes[:-1]) for b in batches):  # inputs only: labels drawn per batch
        ctx.info("sparse-update: calibration batches have no labels; scoring with seeded random labels")
        return [(*b, graph.random_inputs(ctx.seed + 1 + i)[-1]) for i, b in enumerate(batches)]
    ctx.info("sparse-update: calibration data is not (inputs..., labels) batches; "
             "scoring on the example batch")
    return [graph.example_inputs]
