"""SmoothQuant for static int8 (``quantize(mode=static, smooth=auto|on|off)``).

Per-tensor int8 activations lose the small channels of a transformer linear's input when
a few channels are much larger (LayerNorm outputs of BERT-style encoders: a handful of
channels 10-100x the median). SmoothQuant (Xiao et al., 2023) moves that range into the
weights, where quantization is per output channel: ``y = (x / s) (W s)^T`` is the same
linear layer for any per-input-channel ``s > 0``, and

    s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)

(max over calibration rows and over the weights of every layer reading ``x``) equalises
the two ranges at ``alpha = 0.5``. The float graph is rescaled exactly (up to fp32
rounding): ``W s`` replaces the weights, and ``1/s`` is folded where AWQ folds its scales
(``awq.find_fold``: a LayerNorm's weight and bias, a previous linear's rows, through
data movement and attention's value side), else multiplied in by an ``aten.mul`` in front
of the layers (a GELU output, for example).

``alpha`` (``smooth_alpha``, default ``auto``): per group of layers reading one input,
the value of ``ALPHAS`` with the least int8 output error ``group_error`` on ``ROWS``
calibration rows, the input's per-tensor range taken over all calibration data (a few
extreme tokens set it); with ``auto`` a group whose error smoothing does not cut stays
unscaled. NNCF uses 0.95 for OpenVINO matmuls.

``smooth=auto`` (the default) considers the linear groups whose input shows outlier
channels on the calibration data: the largest channel range at least ``OUTLIER_RATIO``
times the median one (at that ratio the median channel is left 127 / 8 ~ 16 of the 256
int8 steps); ``on`` every linear group, ``off`` none. Convolutions are never smoothed.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from ...rewrite.graph import Graph
from .awq import apply_fold, find_fold, insert_input_mul
from .layers import QLayer, layer_input, observe

SMOOTH = ("auto", "on", "off")
OUTLIER_RATIO = 8.0
ALPHAS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)   # smooth_alpha=auto: the grid searched
ROWS = 512           # calibration rows per group input kept for the alpha search
_EPS = 1e-5


def channel_ratio(amax: torch.Tensor) -> float:
    """Largest over median per-channel range (channels that are never nonzero left out)."""
    live = amax[amax > 0]
    if live.numel() == 0:
        return 1.0
    return float(live.max() / live.median())


def smooth_scales(amax_x: torch.Tensor, amax_w: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = amax_x_j^alpha / amax_w_j^(1 - alpha)``; 1 where either range is 0."""
    x, w = amax_x.double(), amax_w.double()
    s = x.clamp(min=_EPS) ** alpha / w.clamp(min=_EPS) ** (1.0 - alpha)
    return torch.where((x > 0) & (w > 0), s, torch.ones_like(s)).clamp(min=_EPS)


def group_error(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, weights: Sequence[torch.Tensor],
                s: torch.Tensor | None) -> float:
    """``sum ||x W^T - fq(x / s) Q(W s)^T||^2`` over the group's layers on rows ``x``:
    per-tensor int8 input over the whole calibration range (per-channel ``lo``/``hi``
    divided by ``s``: the few extreme tokens set it even where the rows miss them),
    per-channel int8 weights (as the pass rounds them)."""
    from .int8_static import dequantize_weight, quantize_weight
    from .observers import fake_quant, qparams

    inv = torch.ones_like(lo) if s is None else 1.0 / s.float()
    xs = x * inv
    xq = fake_quant(xs, *qparams(float((lo * inv).min()), float((hi * inv).max())))
    err = 0.0
    for w in weights:
        ws = w.float() if s is None else (w.double() * s).float()
        wq = dequantize_weight(*quantize_weight(ws))
        err += float(((x @ w.float().T - xq @ wq.T) ** 2).sum())
    return err


def smooth_linears(graph: Graph, layers: Sequence[QLayer], samples: Sequence[tuple], *, mode: str,
                   alpha: float | str, progress=None) -> dict[str, Any]:
    """Rescale the float graph in place; returns the report (per group: layers, outlier
    ratio before/after, alpha, the group's int8 output error with and without, where 1/s
    went). ``alpha="auto"``: the value of ``ALPHAS`` with the least group error on the
    calibration rows; a group whose error smoothing does not cut stays as it is."""
    groups: dict[fx.Node, list[QLayer]] = {}
    for l in layers:
        if l.kind == "linear":
            groups.setdefault(layer_input(l), []).append(l)
    report: dict[str, Any] = {"mode": mode, "alpha": alpha, "outlier_ratio": OUTLIER_RATIO, "groups": []}
    if mode == "off" or not groups:
        return report
    amax: dict[fx.Node, torch.Tensor] = {}
    lo: dict[fx.Node, torch.Tensor] = {}
    hi: dict[fx.Node, torch.Tensor] = {}
    rows: dict[fx.Node, list[torch.Tensor]] = {x: [] for x in groups}
    per_sample = max(1, -(-ROWS // max(1, len(samples))))

    def watch(x: fx.Node):
        def fn(v: torch.Tensor) -> None:
            flat = v.detach().float().reshape(-1, v.shape[-1])
            m = flat.abs().amax(0)
            amax[x] = torch.maximum(amax[x], m) if x in amax else m
            lo[x] = torch.minimum(lo[x], flat.amin(0)) if x in lo else flat.amin(0)
            hi[x] = torch.maximum(hi[x], flat.amax(0)) if x in hi else flat.amax(0)
            idx = torch.linspace(0, flat.shape[0] - 1, min(per_sample, flat.shape[0])).round().long()
            rows[x].append(flat[idx].clone())
        return fn
    observe(graph, samples, {x: watch(x) for x in groups}, progress, "smoothquant: input channel ranges")

    order = {n: i for i, n in enumerate(graph.nodes)}
    for x in sorted(groups, key=order.__getitem__):
        group = groups[x]
        a_x = amax[x]
        ratio = channel_ratio(a_x)
        entry = {"layers": [l.path for l in group], "ratio_before": round(ratio, 2)}
        if mode == "auto" and ratio < OUTLIER_RATIO:
            report["groups"].append({**entry, "smoothed": False})
            continue
        weights = [graph.attr(l.weight_node).detach() for l in group]
        a_w = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)
        fold = find_fold(graph, x, {l.node for l in group})
        X = torch.cat(rows.pop(x))[:ROWS]
        err0 = group_error(X, lo[x], hi[x], weights, None)
        best = None
        for a in (ALPHAS if alpha == "auto" else (alpha,)):
            s = smooth_scales(a_x, a_w, a)
            if fold is not None:
                # channels of x that copy one producer channel must share its scale
                t = torch.zeros(fold.n_channels, dtype=s.dtype).index_reduce_(0, fold.channel, s, "amax",
                                                                               include_self=False)
                s = t[fold.channel]
            err = group_error(X, lo[x], hi[x], weights, s)
            if best is None or err < best[0]:
                best = (err, a, s)
        err, a, s = best
        entry.update(alpha=a, group_error=round(err, 6), group_error_unsmoothed=round(err0, 6))
        if alpha == "auto" and not err < err0:
            report["groups"].append({**entry, "smoothed": False})
            continue
        if fold is not None:
            apply_fold(graph, fold, s)
            where = fold.kind + ":" + (fold.producer.name)
        else:
            insert_input_mul(graph, x, group, s, tag="smooth")
            where = "input-mul"
        for l, w in zip(group, weights):
            graph.set_attr(l.weight_node, (w.double() * s).to(w.dtype))
        report["groups"].append({**entry, "smoothed": True, "folded_into": where,
                                 "ratio_after": round(channel_ratio(a_x.double() / s), 2)})
    graph.graph.lint()
    graph.gm.recompile()
    return report


__all__ = ["smooth_linears", "smooth_scales", "channel_ratio", "SMOOTH", "OUTLIER_RATIO"]
