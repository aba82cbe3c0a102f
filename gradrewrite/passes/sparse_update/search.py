"""Budget search: the best sparse-update scheme under a memory budget.

Contribution score (a cheap proxy, validated against real fine-tuning in
benchmarks/training_memory.py): the first-order loss decrease one SGD step buys,
``lr * ||g_selected||^2``, with ``g`` the gradient on the user's data (the full
training step is run once per calibration batch; ``g = (p - p_new) / lr``). A bias
scheme scores the sum over its layers; a weight entry ``layer:ratio`` the squared norm
of the gradient rows it updates. Memory is not estimated: every candidate is pruned,
reordered and planned, and its planned SRAM peak is what must fit.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any, Callable, Iterable, Sequence

import torch

from ...errors import ConfigError
from ...rewrite.graph import Graph
from ...rewrite.memory_plan import memory_report
from .config import Layer, Scheme
from .prune import apply_scheme
from .reorder import reorder_updates

RATIOS = (Fraction(1), Fraction(1, 2), Fraction(1, 4), Fraction(1, 8))


def gradients(graph: Graph, batches: Iterable[Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Summed squared gradients per trained parameter over ``batches`` (full step graph)."""
    ts = graph.meta["train_step"]
    lr = ts["optimizer"]["lr"]
    sq: dict[str, torch.Tensor] = {}
    for batch in batches:
        outs = graph(*batch)
        for what, new in zip(ts["outputs"][1:], outs[1:]):
            if what not in ts["params"]:
                continue
            g = (graph.attr(ts["params"][what]["attr"]) - new) / lr
            sq[what] = sq.get(what, 0) + g.double() ** 2
    return sq


def scores(layers: list[Layer], sq: dict[str, torch.Tensor], lr: float) -> dict[str, Any]:
    bias = {l.path: float(lr * sq[l.bias].sum()) for l in layers if l.bias and l.bias in sq}
    weight = {}
    for l in layers:
        if l.weight not in sq:
            continue
        rows_sq = sq[l.weight].reshape(l.out_channels, -1).sum(1)
        weight[l.path] = {str(r): float(lr * rows_sq[: l.rows(r)].sum()) for r in RATIOS}
    return {"bias": bias, "weight": weight}


def _chosen(scheme: Scheme, layers: list[Layer]) -> dict[str, int | None]:
    with_bias = [l for l in layers if l.bias]
    chosen: dict[str, int | None] = {l.bias: None for l in with_bias[len(with_bias) - scheme.bias_last:]} \
        if scheme.bias_last else {}
    by_path = {l.path: l for l in layers}
    for path, ratio in scheme.weights:
        l = by_path[path]
        rows = l.rows(ratio)
        chosen[l.weight] = None if rows == l.out_channels else rows
    return chosen


def scheme_memory(graph: Graph, scheme: Scheme, layers: list[Layer], *, reorder: bool = True) -> dict:
    trial = graph.clone()
    apply_scheme(trial, _chosen(scheme, layers), layers)
    if reorder:
        reorder_updates(trial)
    return memory_report(trial)


def search(graph: Graph, layers: list[Layer], budget: int, sc: dict[str, Any], *,
           max_weight_layers: int = 8,
           progress: Callable[[str], None] | None = None) -> tuple[Scheme, list[dict]]:
    """Greedy under ``budget`` bytes of planned SRAM; returns the scheme and the trials."""
    trials: list[dict] = []
    cache: dict[Scheme, int] = {}

    def mem(s: Scheme) -> int:
        if s not in cache:
            cache[s] = scheme_memory(graph, s, layers)["sram_bytes"]
            trials.append({"scheme": s.text(), "sram_bytes": cache[s]})
            if progress:
                progress(f"sparse-update search: {s.text()} -> {cache[s] / 1024:.1f} KB")
        return cache[s]

    n_bias = sum(1 for l in layers if l.bias)
    smallest = Scheme(bias_last=1) if n_bias else Scheme(weights=((layers[-1].path, RATIOS[-1]),))
    if mem(smallest) > budget:
        raise ConfigError(f"budget {budget / 1024:.1f} KB is too small for any sparse-update scheme: "
                          f"the smallest ({smallest.text()}) needs {mem(smallest) / 1024:.1f} KB",
                          f"give budget >= {mem(smallest) / 1024:.0f}KB")
    lo, hi = (1, n_bias) if n_bias else (0, 0)
    while lo < hi:  # the most biases that fit (memory grows with the bias depth)
        mid = (lo + hi + 1) // 2
        if mem(Scheme(bias_last=mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    best = Scheme(bias_last=lo) if n_bias else smallest
    # weights: the best-scoring layers first, each at the largest ratio that still fits
    ranked = sorted(sc["weight"].items(), key=lambda kv: -kv[1]["1"])[:max_weight_layers]
    for path, by_ratio in ranked:
        if any(p == path for p, _ in best.weights):
            continue
        for ratio in RATIOS:
            cand = Scheme(best.bias_last, best.biases,
                          tuple(sorted(best.weights + ((path, ratio),))))
            if mem(cand) <= budget:
                best = cand
                break
    return best, trials


def scheme_score(scheme: Scheme, layers: list[Layer], sc: dict[str, Any]) -> float:
    with_bias = [l for l in layers if l.bias]
    total = sum(sc["bias"].get(l.path, 0.0) for l in with_bias[len(with_bias) - scheme.bias_last:]) \
        if scheme.bias_last else 0.0
    total += sum(sc["weight"].get(p, {}).get(str(r), 0.0) for p, r in scheme.weights)
    return total
