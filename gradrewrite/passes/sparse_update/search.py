"""Budget search: the best sparse-update scheme under a memory budget.

Every candidate scheme is pruned, reordered, run through the passes that follow
sparse-update in the pipeline (``qas``: the step as it will be compiled) and planned by
the target backend's own planner (``PassContext.plan_memory``: the mcu backend lowers
the step and plans the arena its C code will use, with the trained parameters as
stored, optimizer state and the input; without a planner of its own, the graph's plan
``rewrite.memory_plan.memory_report``). A candidate the later passes or the planner
refuse (``qas`` with no trained int8 weight, an op the backend cannot lower) is not
taken, so the scheme returned compiles.

Contribution score (a cheap proxy): the first-order loss decrease one SGD step buys,
``lr * ||g||^2``, with ``g`` the gradient on the user's data (the full training step
runs once per calibration batch; ``g = (p - p_new) / lr``). An int8-stored weight
(``mul(w_q, s)``) trained with ``qas`` moves ``w`` by ``lr * g_w``, so its rows score
``lr * ||g_q||^2 / s^2`` (``g_q = s * g_w``), in the units of an fp32 bias. A bias move
scores its layer's bias, a weight move ``layer:ratio`` the gradient rows it updates.

The search (greedy by score per byte, so a big early layer must buy its memory):

1. every move alone (each layer's weight at 1/8, 1/4, 1/2, 1 of its output channels,
   and its bias; the last layers included) is planned, layer by layer from the output:
   a layer's larger ratios are skipped once one is over the budget, and the walk stops
   ``DEPTH_PATIENCE`` layers in a row where nothing fits (the backward and its memory
   grow with depth). Once a bias alone is refused (``qas`` needs a trained int8
   weight), biases are planned beside the cheapest feasible move instead. The smallest
   feasible plan is the least any scheme needs (a budget below it is refused, naming it);
2. a move's cost is the planned bytes it adds to the cheapest plan (or to the move it
   was planned beside);
3. from the feasible move with the best score per byte that fits, moves are added in
   order of score per byte, each kept when the planned scheme still fits (until
   ``GREEDY_PATIENCE`` in a row do not); a weight move replaces a smaller ratio of the
   same layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterable, Sequence

import torch

from ...errors import ConfigError, GradrewriteError
from ...rewrite.graph import Graph
from .config import Layer, Scheme
from .prune import apply_scheme
from .reorder import reorder_updates

RATIOS = (Fraction(1), Fraction(1, 2), Fraction(1, 4), Fraction(1, 8))
DEPTH_PATIENCE = 3    # layers in a row (from the output) where no move fits end the walk to the input
GREEDY_PATIENCE = 16  # candidates in a row that do not fit end the greedy


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


def scores(layers: list[Layer], sq: dict[str, torch.Tensor], lr: float,
           row_scales: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Bias and weight (per ratio) scores; ``row_scales``: per-row scale ``s`` of int8-stored
    weights trained with QAS (rows score ``lr * ||g_q||^2 / s^2``)."""
    bias = {l.path: float(lr * sq[l.bias].sum()) for l in layers if l.bias and l.bias in sq}
    weight = {}
    for l in layers:
        if l.weight not in sq:
            continue
        rows_sq = sq[l.weight].reshape(l.out_channels, -1).sum(1)
        if row_scales and l.weight in row_scales:
            rows_sq = rows_sq / row_scales[l.weight].double().reshape(-1) ** 2
        weight[l.path] = {str(r): float(lr * rows_sq[: l.rows(r)].sum()) for r in RATIOS}
    return {"bias": bias, "weight": weight}


def _chosen(scheme: Scheme, layers: list[Layer]) -> dict[str, int | None]:
    with_bias = [l for l in layers if l.bias]
    chosen: dict[str, int | None] = {l.bias: None for l in with_bias[len(with_bias) - scheme.bias_last:]} \
        if scheme.bias_last else {}
    by_path = {l.path: l for l in layers}
    for path in scheme.biases:
        chosen[by_path[path].bias] = None
    for path, ratio in scheme.weights:
        l = by_path[path]
        rows = l.rows(ratio)
        chosen[l.weight] = None if rows == l.out_channels else rows
    return chosen


def scheme_memory(graph: Graph, scheme: Scheme, layers: list[Layer], plan: Callable[[Graph], dict], *,
                  reorder: bool = True) -> dict:
    """``plan`` of the training step pruned to ``scheme`` (a clone; ``graph`` is untouched)."""
    trial = graph.clone()
    apply_scheme(trial, _chosen(scheme, layers), layers)
    if reorder:
        reorder_updates(trial)
    trial.meta["train_step"]["sparse_update"] = {"scheme": scheme.text(), "reorder": reorder}
    return plan(trial)


@dataclass(frozen=True)
class Move:
    kind: str                      # bias | weight
    path: str                      # layer path
    ratio: Fraction | None = None  # weight moves: the share of output channels
    score: float = 0.0

    def text(self) -> str:
        return f"bias {self.path}" if self.kind == "bias" else f"weight {self.path}:{self.ratio}"


def moves(layers: list[Layer], sc: dict[str, Any]) -> list[Move]:
    """Every bias and every weight at every ratio (partial channels of dense and depthwise
    layers only) whose score is positive."""
    out = [Move("bias", p, None, s) for p, s in sc["bias"].items() if s > 0]
    for l in layers:
        rows_seen = set()  # ratios that give the same rows (1/4 and 1/8 of 3 channels) are one move
        for ratio in RATIOS:
            s = sc["weight"].get(l.path, {}).get(str(ratio), 0.0)
            if (ratio < 1 and l.groups not in (1, l.out_channels)) or s <= 0 or l.rows(ratio) in rows_seen:
                continue
            rows_seen.add(l.rows(ratio))
            out.append(Move("weight", l.path, ratio, s))
    return out


def as_scheme(picked: Iterable[Move], layers: list[Layer]) -> Scheme:
    """The scheme of a set of moves, in canonical form: the biases of the last layers as
    bias_last, other biases by path, one ratio per weight (the largest)."""
    picked = list(picked)
    biases = {m.path for m in picked if m.kind == "bias"}
    with_bias = [l.path for l in layers if l.bias]
    k = 0
    while k < len(with_bias) and with_bias[len(with_bias) - 1 - k] in biases:
        k += 1
    tail = set(with_bias[len(with_bias) - k:])
    ratio: dict[str, Fraction] = {}
    for m in picked:
        if m.kind == "weight":
            ratio[m.path] = max(ratio.get(m.path, m.ratio), m.ratio)
    order = {l.path: i for i, l in enumerate(layers)}
    return Scheme(k, tuple(sorted(biases - tail, key=order.__getitem__)),
                  tuple(sorted(ratio.items(), key=lambda kv: order[kv[0]])))


def search(graph: Graph, layers: list[Layer], budget: int, sc: dict[str, Any],
           plan: Callable[[Graph], dict], *,
           progress: Callable[[str], None] | None = None) -> tuple[Scheme, list[dict], dict]:
    """The scheme (greedy by score per planned byte, module docstring) whose planned
    ``sram_bytes`` fit ``budget``; returns it, every trial, and its plan."""
    trials: list[dict] = []
    cache: dict[Scheme, dict | str] = {}

    def mem(picked: Iterable[Move]) -> dict | str:
        """The plan of a set of moves, or why it cannot be compiled."""
        s = as_scheme(picked, layers)
        if s not in cache:
            try:
                cache[s] = scheme_memory(graph, s, layers, plan)
                trials.append({"scheme": s.text(), "sram_bytes": cache[s]["sram_bytes"]})
                if progress:
                    progress(f"sparse-update search: {s.text()} -> {cache[s]['sram_bytes'] / 1024:.1f} KB")
            except GradrewriteError as exc:
                cache[s] = exc.message.splitlines()[0]
                trials.append({"scheme": s.text(), "refused": cache[s]})
        return cache[s]

    every = moves(layers, sc)
    if not every:
        raise ConfigError("no parameter of the training step has a gradient on the calibration data",
                          "give calibration batches (inputs, labels), or an explicit scheme")
    alone: dict[Move, dict | str] = {}
    cost: dict[Move, int] = {}
    cheapest: Move | None = None   # the least planned feasible move so far
    biases_refused = False         # a bias alone was refused (qas): plan biases beside `cheapest`
    misses, deepest = 0, None
    for l in reversed(layers):  # from the output: the backward, and its memory, grows with depth
        deepest = l.path
        here = sorted((m for m in every if m.path == l.path), key=lambda m: (m.kind == "bias", m.ratio or 0))
        fits = over = False
        for m in here:  # the weight from the fewest channels up, then the bias
            if m.kind == "weight" and over:
                continue  # more channels of this layer need more
            if m.kind == "bias" and biases_refused and cheapest is not None:
                p = mem([cheapest, m])
                if isinstance(p, dict):
                    cost[m] = p["sram_bytes"] - alone[cheapest]["sram_bytes"]
                    fits = fits or p["sram_bytes"] <= budget
                continue
            alone[m] = p = mem([m])
            if isinstance(p, str):
                biases_refused = biases_refused or m.kind == "bias"
                continue
            if cheapest is None or p["sram_bytes"] < alone[cheapest]["sram_bytes"]:
                cheapest = m
            fits = fits or p["sram_bytes"] <= budget
            over = p["sram_bytes"] > budget
        misses = 0 if fits else misses + (1 if here else 0)
        if misses >= DEPTH_PATIENCE:  # this many layers in a row fit no move: deeper ones will not
            break
    feasible = {m: p["sram_bytes"] for m, p in alone.items() if isinstance(p, dict)}
    if not feasible:
        reasons = sorted({p for p in alone.values() if isinstance(p, str)})
        raise ConfigError(f"no single bias or weight can be trained: {reasons[0]}",
                          "check the pipeline after sparse-update, or give an explicit scheme")
    floor = feasible[cheapest]
    if floor > budget:
        need = math.ceil(floor / 1024)
        raise ConfigError(f"budget {budget / 1024:.1f} KB is too small for any sparse-update scheme: the smallest "
                          f"({as_scheme([cheapest], layers).text()}) needs {floor / 1024:.1f} KB",
                          f"give budget >= {need}KB")
    cost.update({m: b - floor for m, b in feasible.items()})
    for m in alone:  # refused alone before a feasible move was known: costed beside the cheapest
        if m not in cost:
            p = mem([cheapest, m])
            if isinstance(p, dict):
                cost[m] = p["sram_bytes"] - floor
    per_byte = lambda m: m.score / (cost[m] + 1)  # noqa: E731
    ranked = sorted(cost, key=per_byte, reverse=True)
    start = next(m for m in ranked if m in feasible and feasible[m] <= budget)
    picked = [start]
    best = alone[start]
    misses = 0
    for m in ranked:
        if m in picked or cost[m] > budget - floor:
            continue
        if misses >= GREEDY_PATIENCE:  # the rest buy less per byte than this many that did not fit
            break
        if m.kind == "weight" and any(p.kind == "weight" and p.path == m.path and p.ratio >= m.ratio
                                      for p in picked):
            continue
        cand = [p for p in picked if not (m.kind == "weight" and p.kind == "weight" and p.path == m.path)] + [m]
        p = mem(cand)
        if isinstance(p, dict) and p["sram_bytes"] <= budget:
            picked, best, misses = cand, p, 0
        else:
            misses += 1
    info = {"moves": len(every), "deepest_layer_planned": deepest, "smallest_bytes": floor,
            "smallest_scheme": as_scheme([cheapest], layers).text(), "plan": best, "moves_taken": [{"move": m.text(), "score": m.score, "cost_bytes": cost[m]}
                                          for m in picked]}
    return as_scheme(picked, layers), trials, info


def scheme_score(scheme: Scheme, layers: list[Layer], sc: dict[str, Any]) -> float:
    with_bias = [l for l in layers if l.bias]
    by_path = {l.path: l for l in layers}
    chosen = {l.path for l in with_bias[len(with_bias) - scheme.bias_last:]} if scheme.bias_last else set()
    chosen |= {p for p in scheme.biases if by_path[p].bias}
    total = sum(sc["bias"].get(p, 0.0) for p in chosen)
    total += sum(sc["weight"].get(p, {}).get(str(r), 0.0) for p, r in scheme.weights)
    return total
