"""Activation-aware weight scaling (AWQ family) for ``quantize(method=awq | awq-gptq)``.

Linear layers that read one input ``x`` (q/k/v after a norm, gate/up after a norm, …) form a
group and share one per-input-channel scale ``s``: ``y = (x / s) (W s)^T`` is the same layer,
but the quantizer now rounds ``W s``, so input channels with large activations get finer
steps. ``s = m^alpha`` (normalised) with ``m = mean |x|`` per channel, and ``alpha`` from the
grid ``0, 1/20, …, 19/20`` minimising the group's output error
``sum_layers ||X W^T - (X / s) Q(W s)^T||^2`` on calibration rows (``alpha = 0`` is plain
round to nearest, so the search never does worse than RTN on those rows).

Where ``1 / s`` goes (the float graph stays the same function, up to fp32 rounding):

- folded into the op that makes ``x`` when every step between is exactly linear per
  channel: a LayerNorm's weight and bias, an RMSNorm-style ``mul`` by a per-channel weight,
  or the rows (and bias) of a previous linear, through data movement (view, transpose,
  split/slice of a fused qkv, GQA expand), products with values that do not come from that
  op (``silu(gate) * up``), positively homogeneous activations (ReLU), eval dropout and the
  value side of attention (``softmax(QK^T) V`` mixes positions, never channels). A channel
  of ``x`` that is a copy of one producer channel (GQA: several heads read one kv head)
  gets the mean statistic of its copies, so the copies share one scale. Every other user
  of the values on the way must see only unscaled channels (e.g. the q and k parts of a
  fused qkv).
- otherwise an explicit ``aten.mul(x, 1/s)`` in front of the group (``input_mul=auto``:
  only where it cuts the group's calibration output error by at least ``MUL_GAIN``;
  ``always`` | ``never``), or the group stays unscaled.

Clipping (``clip=true``, ``method=awq``): after scaling, each (output row, group) range is
shrunk towards its own centre by the factor from ``1, 0.975, …, 0.5`` with the least error
of that group's part of the output on calibration rows. Clipping only changes the weights
that are rounded; the float graph keeps the unclipped ones.

GWQ outliers (``outliers=f``) stay exact and are left out of every range searched here, as in
round to nearest.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from ...rewrite.calibration import progress as iterate
from ...rewrite.graph import Graph, copy_meta, module_path
from .layers import QLayer, layer_input, observe
from .weight_only import group_params

aten = torch.ops.aten

N_GRID = 20          # alpha in {0, 1/20, ..., 19/20}
AWQ_ROWS = 2048      # calibration rows kept per group input (spread over the samples)
CLIP_ROWS = 512      # of those, rows used by the clipping search
CLIP_STEPS = 10      # shrink factors 1 - i/20, i = 0..10 (down to 0.5)
MUL_GAIN = 0.05      # input_mul=auto: insert the mul only for >= 5% less group error
INPUT_MUL = ("auto", "always", "never")

# ops whose output channels are a rearrangement of their input's (executed on channel labels)
_MOVE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
         aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
         aten.squeeze.default, aten.expand.default, aten.clone.default, aten.contiguous.default,
         aten.alias.default, aten.detach.default, aten.slice.Tensor, aten.split.Tensor,
         aten.split_with_sizes.default, aten.flatten.using_ints, aten.unflatten.int,
         aten.select.int, operator.getitem}
# value-preserving in fp32: dropout in eval, a cast to the same dtype
_IDENTITY = {aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}
# f(a * s) = f(a) * s per element for s > 0 (the other operand does not depend on the path)
_HOMOGENEOUS = {aten.mul.Tensor: (0, 1), aten.mul.Scalar: (0,), aten.div.Tensor: (0,),
                aten.div.Scalar: (0,), aten.neg.default: (0,), aten.relu.default: (0,),
                aten.leaky_relu.default: (0,)}
# out[..., i, d] = sum_j a[..., i, j] v[..., j, d]: linear in v per channel d (path arg: v)
_MIX_ROWS = {aten.scaled_dot_product_attention.default: 2, aten.matmul.default: 1,
             aten.bmm.default: 1}
_HARMLESS = {aten._assert_tensor_metadata.default, aten.sym_size.int}


@dataclass
class Fold:
    """``1/t`` folded into ``producer``; consumer channel ``c`` reads producer channel ``channel[c]``."""
    producer: fx.Node
    kind: str                    # linear | layer_norm | rms_norm | mul
    channel: torch.Tensor        # int64 [C]
    n_channels: int


@dataclass
class AwqResult:
    info: dict[str, dict[str, Any]] = field(default_factory=dict)          # per layer, for the report
    scales: dict[str, torch.Tensor] = field(default_factory=dict)          # input scale s per layer
    to_round: dict[str, torch.Tensor] = field(default_factory=dict)        # clipped weights to round


# ------------------------------------------------------------------------------ fold analysis
def _val(node: Any):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _unique_attr(graph: Graph, node: Any, user: fx.Node) -> bool:
    """A stored tensor that only ``user`` reads (so rescaling it changes nothing else)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    users = {u for n in graph.nodes if n.op == "get_attr" and n.target == node.target for u in n.users}
    return users == {user}


def _producer_kind(graph: Graph, node: fx.Node) -> str | None:
    """The form of ``node`` when its output channels can absorb a per-channel ``1/t`` exactly."""
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dtype != torch.float32 or val.dim() == 0:
        return None
    c = val.shape[-1]
    if node.target == aten.linear.default:
        bias = node.args[2] if len(node.args) > 2 else None
        if _unique_attr(graph, node.args[1], node) and (bias is None or _unique_attr(graph, bias, node)):
            return "linear"
    elif node.target == aten.layer_norm.default and len(node.args[1]) == 1:
        args = list(node.args) + [None] * (4 - len(node.args))
        if all(a is None or _unique_attr(graph, a, node) for a in args[2:4]):
            return "layer_norm"
    elif node.target == aten.rms_norm.default and len(node.args[1]) == 1:
        w = node.args[2] if len(node.args) > 2 else None
        if w is None or _unique_attr(graph, w, node):
            return "rms_norm"
    elif node.target == aten.mul.Tensor:   # x * weight[C] (RMSNorm, layer scale)
        for w in node.args:
            t = _val(w)
            if isinstance(t, torch.Tensor) and t.numel() == c and t.shape[-1] == c and c > 1 \
                    and _unique_attr(graph, w, node):
                return "mul"
    return None


def _path_args(node: fx.Node) -> tuple[int, ...]:
    """Which arguments of ``node`` a channel-linear path may come through."""
    if node.target in _MOVE or node.target in _IDENTITY:
        return (0,)
    if node.target in _HOMOGENEOUS:
        return _HOMOGENEOUS[node.target]
    if node.target in _MIX_ROWS:
        return (_MIX_ROWS[node.target],)
    return ()


def _chains(graph: Graph, x: fx.Node, depth: int = 48):
    """Candidate chains ``[producer, …, x]`` going back from ``x`` (depth first)."""
    def back(node: fx.Node, tail: list[fx.Node], d: int):
        if _producer_kind(graph, node):
            yield [node] + tail
        if d == 0 or node.op != "call_function":
            return
        for i in _path_args(node):
            if i < len(node.args) and isinstance(node.args[i], fx.Node):
                yield from back(node.args[i], [node] + tail, d - 1)
    yield from back(x, [], depth)


def _labels_through(node: fx.Node, arg: fx.Node, labels: Any) -> Any:
    """Channel labels of ``node``'s output given ``labels`` of its path argument (None: not linear)."""
    t = node.target
    if t in _IDENTITY:
        if t == aten.dropout.default and (len(node.args) < 3 or node.args[2]):
            return None
        src, out = _val(arg), _val(node)
        return labels if getattr(src, "dtype", None) == getattr(out, "dtype", 1) else None
    if t in _MOVE:
        if t is operator.getitem:
            out = labels[node.args[1]]
            return out.contiguous() if isinstance(out, torch.Tensor) else out
        args = [labels if a is arg else a for a in node.args]
        if any(isinstance(a, fx.Node) for a in args) or \
                any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            return None
        try:
            out = t(*args, **node.kwargs)
        except RuntimeError:
            return None
        return out.contiguous() if isinstance(out, torch.Tensor) else out
    out = _val(node)
    if not isinstance(out, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return None
    if t in _HOMOGENEOUS:
        if t == aten.div.Tensor and node.args[1] is arg:
            return None
        if t == aten.mul.Tensor and node.args[0] is node.args[1]:
            return None
        if t == aten.leaky_relu.default and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
            return None
        return torch.broadcast_to(labels, out.shape).contiguous()
    if t in _MIX_ROWS:
        if labels.dim() < 2 or not bool((labels == labels[..., :1, :]).all()):
            return None   # a channel must not change along the mixed (sequence) axis
        if t == aten.scaled_dot_product_attention.default and node.kwargs.get("enable_gqa"):
            rep = out.shape[-3] // labels.shape[-3]
            labels = labels.repeat_interleave(rep, dim=-3)
        return torch.broadcast_to(labels[..., :1, :], out.shape).contiguous()
    return None


def _check_chain(chain: list[fx.Node], consumers: set[fx.Node]) -> torch.Tensor | None:
    """Channel map ``[C]`` (consumer channel -> producer channel) when ``chain`` is exact."""
    producer, x = chain[0], chain[-1]
    shape = _val(producer).shape
    labels: dict[fx.Node, Any] = {
        producer: torch.arange(shape[-1], dtype=torch.float64).expand(shape).contiguous()}
    for prev, node in zip(chain, chain[1:]):
        labels[node] = _labels_through(node, prev, labels[prev])
        if labels[node] is None:
            return None
    xl = labels[x]
    if not isinstance(xl, torch.Tensor) or xl.dim() == 0:
        return None
    flat = xl.reshape(-1, xl.shape[-1])
    if not bool((flat == flat[:1]).all()):
        return None   # a channel of x reads different producer channels at different positions
    channel = flat[0].long()
    reached = set(channel.tolist())
    # users off the chain must see only unscaled channels (e.g. q/k of a fused qkv)
    for i, node in enumerate(chain):
        allowed = consumers if node is x else {chain[i + 1]}
        for u in node.users:
            if u in allowed or u.target in _HARMLESS:
                continue
            if node is x or u.target not in _MOVE:
                return None
            side = _labels_through(u, node, labels[node])
            if not isinstance(side, torch.Tensor) or reached & set(side.unique().long().tolist()):
                return None
    return channel


def find_fold(graph: Graph, x: fx.Node, consumers: set[fx.Node]) -> Fold | None:
    """Where ``x``'s per-channel ``1/s`` can go exactly, or None."""
    for chain in _chains(graph, x):
        channel = _check_chain(chain, consumers)
        if channel is not None:
            p = chain[0]
            return Fold(p, _producer_kind(graph, p), channel, int(_val(p).shape[-1]))
    return None


def _fold_path(graph: Graph, fold: Fold) -> str:
    p = fold.producer
    w = p.args[1] if fold.kind == "linear" else next((a for a in p.args if isinstance(a, fx.Node)
                                                      and a.op == "get_attr"), None)
    return module_path(p) or (module_path(w) if w is not None else p.name)


def apply_fold(graph: Graph, fold: Fold, s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``t`` (``t[channel[c]] = s[c]``)."""
    t = torch.ones(fold.n_channels, dtype=torch.float64)
    t[fold.channel] = s.double()
    p = fold.producer

    def scale(node: Any, dims: int = 1) -> None:
        if isinstance(node, fx.Node):
            v = graph.attr(node)
            graph.set_attr(node, (v.double() / t.reshape(v.shape[-1:] if dims == 1 else (-1, 1))).to(v.dtype))

    if fold.kind == "linear":
        scale(p.args[1], dims=2)
        if len(p.args) > 2:
            scale(p.args[2])
    elif fold.kind in ("layer_norm", "rms_norm"):
        w_index = 2
        w = p.args[w_index] if len(p.args) > w_index else None
        if w is None:   # no affine weight: give it one that holds 1/t
            w = graph.add_attr(f"{_fold_path(graph, fold).replace('.', '_') or 'norm'}_awq_weight",
                               (1.0 / t).float(), before=p, parameter=False)
            args = list(p.args) + [None] * (w_index + 1 - len(p.args))
            args[w_index] = w
            p.args = tuple(args)
        else:
            scale(w)
        if fold.kind == "layer_norm" and len(p.args) > 3:
            scale(p.args[3])
    else:   # mul by a per-channel weight
        w = next(a for a in p.args if isinstance(a, fx.Node) and a.op == "get_attr"
                 and _val(a) is not None and _val(a).numel() == fold.n_channels)
        v = graph.attr(w)
        graph.set_attr(w, (v.double() / t.reshape(v.shape)).to(v.dtype))


def insert_input_mul(graph: Graph, x: fx.Node, group: Sequence[QLayer], s: torch.Tensor, *,
                     tag: str = "awq") -> None:
    """``x * (1/s)`` in front of the group's layers only (other users of ``x`` keep ``x``);
    the buffer is ``<weight>_<tag>_inv_scale`` (smoothquant.py uses it with tag ``smooth``)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min((l.node for l in group), key=order.__getitem__)
    inv = graph.add_attr(f"{group[0].param}_{tag}_inv_scale", (1.0 / s.double()).float(),
                         before=first, parameter=False)
    with graph.graph.inserting_before(first):
        mul = graph.graph.call_function(aten.mul.Tensor, (x, inv))
    copy_meta(first, mul)
    if "val" in x.meta:
        mul.meta["val"] = x.meta["val"]
    mul.meta.setdefault("gradrewrite", {})[tag] = "input scale 1/s"
    for l in group:
        l.node.replace_input_with(x, mul)


# ------------------------------------------------------------------------------ search
def fake_quantize(w: torch.Tensor, bits: int, group: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """What ``quantize_groupwise(w, bits, group, mask).dequantized()`` gives, without packing
    (the search calls it hundreds of times; a test keeps the two equal)."""
    keep = mask if mask is not None else torch.zeros_like(w, dtype=torch.bool)
    wp, kp = _grouped(w, group), _grouped(keep, group)
    scale16, zero = group_params(wp, kp, bits)
    s = scale16.float()[..., None]
    codes = torch.clamp(torch.round(wp / s) + zero[..., None], 0, (1 << bits) - 1)
    deq = ((codes - zero[..., None]) * s).flatten(1)[:, :w.shape[1]]
    return torch.where(keep, w.half().float(), deq)


def _grouped(t: torch.Tensor, group: int) -> torch.Tensor:
    """``[R, K]`` -> ``[R, G, group]``, the last group zero-padded (storage layout)."""
    pad = -t.shape[1] % group
    return torch.nn.functional.pad(t, (0, pad)).reshape(t.shape[0], -1, group)


def _scales(m: torch.Tensor, alpha: float) -> torch.Tensor:
    """``m^alpha``, relative to the largest channel (dead channels floored at 1e-4), then
    centred so ``max * min = 1`` (keeps the rescaled weights and the fp16 group scales in a
    comfortable range)."""
    s = (m / m.max().clamp(min=1e-30)).clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def search_scale(x: torch.Tensor, m: torch.Tensor, weights: Sequence[torch.Tensor],
                 masks: Sequence[torch.Tensor | None], bits: int, group: int
                 ) -> tuple[float, torch.Tensor, float, float]:
    """Best ``alpha`` on rows ``x``: (alpha, s, relative error at alpha, at alpha=0)."""
    refs = [x @ w.T for w in weights]
    norm = sum(float((r * r).sum()) for r in refs) or 1.0
    best = (0.0, torch.ones_like(m), math.inf)
    err0 = math.inf
    for i in range(N_GRID):
        alpha = i / N_GRID
        s = _scales(m, alpha) if i else torch.ones_like(m)
        xs = x / s
        err = sum(float(((xs @ fake_quantize(w * s, bits, group, k).T - r) ** 2).sum())
                  for w, k, r in zip(weights, masks, refs)) / norm
        if i == 0:
            err0 = err
        if err < best[2]:
            best = (alpha, s, err)
    return best[0], best[1], best[2], err0


def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group: int,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """Per (row, group) shrink of the weight range with the least error of that group's part
    of the output on rows ``x``. Returns the clipped weight and the mean factor kept."""
    n, k = w.shape
    keep = mask if mask is not None else torch.zeros_like(w, dtype=torch.bool)
    wp, kp, xg = _grouped(w, group), _grouped(keep, group), _grouped(x, group)
    g_n = wp.shape[1]
    lo = torch.where(kp, torch.inf, wp).amin(-1, keepdim=True)
    hi = torch.where(kp, -torch.inf, wp).amax(-1, keepdim=True)
    lo, hi = torch.nan_to_num(lo, posinf=0.0), torch.nan_to_num(hi, neginf=0.0)
    centre = (lo + hi) / 2
    best_err = torch.full((n, g_n), math.inf)
    best_w = wp.clone()
    best_f = torch.ones(n, g_n)
    for i in range(CLIP_STEPS + 1):
        f = 1.0 - i / (2 * CLIP_STEPS)
        wc = torch.where(kp, wp, torch.clamp(wp, centre + (lo - centre) * f, centre + (hi - centre) * f))
        q = fake_quantize(wc.reshape(n, -1)[:, :k], bits, group, mask)
        d = _grouped(w - q, group)
        err = torch.einsum("rgk,ngk->rgn", xg, d).pow(2).mean(0).T   # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_w = torch.where(better[..., None], wc, best_w)
        best_f = torch.where(better, torch.full_like(best_f, f), best_f)
    return best_w.reshape(n, -1)[:, :k].contiguous(), float(best_f.mean())


# ------------------------------------------------------------------------------ the step
def awq_scale(graph: Graph, layers: Sequence[QLayer], samples: Sequence[tuple], bits: int, group: int,
              *, masks: dict[str, torch.Tensor] | None = None, clip: bool = True,
              input_mul: str = "auto", progress=None, padding=None) -> AwqResult:
    """Search, fold / insert and (optionally) clip; the graph is rewritten in place (float
    weights rescaled, ``1/s`` folded or multiplied in), nothing is rounded yet."""
    masks = masks or {}
    groups: dict[fx.Node, list[QLayer]] = {}
    for l in layers:
        groups.setdefault(layer_input(l), []).append(l)
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = sorted(groups, key=order.__getitem__)

    # one calibration pass: mean |x| per channel over all rows, and evenly spread rows
    per_sample = max(1, math.ceil(AWQ_ROWS / max(1, len(samples))))
    abs_sum = {x: 0.0 for x in inputs}
    n_rows = {x: 0 for x in inputs}
    rows: dict[fx.Node, list[torch.Tensor]] = {x: [] for x in inputs}

    def watch_fn(x: fx.Node):
        def fn(v: torch.Tensor) -> None:
            flat = (padding.rows(v.detach()) if padding else v.detach().reshape(-1, v.shape[-1])).float()
            abs_sum[x] = abs_sum[x] + flat.abs().sum(0)
            n_rows[x] += flat.shape[0]
            idx = torch.linspace(0, flat.shape[0] - 1, min(per_sample, flat.shape[0])).round().long()
            rows[x].append(flat[idx].clone())
        return fn
    observe(graph, padding.track(samples) if padding else samples, {x: watch_fn(x) for x in inputs},
            progress, "awq: observing layer inputs")

    result = AwqResult()
    clip_rows: dict[fx.Node, torch.Tensor] = {}
    for x in iterate(progress, "awq: scale search per layer group", inputs):
        group_layers = groups[x]
        X = torch.cat(rows.pop(x))[:AWQ_ROWS]
        m = abs_sum[x] / max(1, n_rows[x])
        fold = find_fold(graph, x, {l.node for l in group_layers})
        if fold is not None:   # copies of one producer channel share one scale: pool their stats
            pooled = torch.zeros(fold.n_channels, dtype=m.dtype).index_add_(0, fold.channel, m)
            count = torch.zeros(fold.n_channels, dtype=m.dtype).index_add_(
                0, fold.channel, torch.ones_like(m))
            m = (pooled / count.clamp(min=1))[fold.channel]
        weights = [graph.attr(l.weight_node).detach().float() for l in group_layers]
        alpha, s, err, err0 = search_scale(X, m, weights, [masks.get(l.param) for l in group_layers],
                                           bits, group)
        gain = 1.0 - err / err0 if err0 > 0 else 0.0
        if alpha == 0.0:
            where = None
        elif fold is not None:
            apply_fold(graph, fold, s)
            where = _fold_path(graph, fold)
        elif input_mul == "always" or (input_mul == "auto" and gain >= MUL_GAIN):
            insert_input_mul(graph, x, group_layers, s)
            where = "input-mul"
        else:
            where = None
        if where is None:
            s = torch.ones_like(s)
        for l, w in zip(group_layers, weights):
            if where is not None:
                graph.set_attr(l.weight_node, (w.double() * s.double()).to(graph.attr(l.weight_node).dtype))
            result.scales[l.param] = s
            result.info[l.param] = {
                "alpha": alpha if where is not None else 0.0, "folded_into": where,
                "foldable": fold is not None,
                **({"alpha_searched": alpha} if where is None and alpha else {}),
                "group_error": round(err if where is not None else err0, 8),
                "group_error_unscaled": round(err0, 8),
                "shared_with": [o.path for o in group_layers if o is not l]}
        if clip:
            clip_rows[x] = X[torch.linspace(0, X.shape[0] - 1, min(CLIP_ROWS, X.shape[0])).round().long()] / s
    # after every fold: a later group may rescale an earlier layer's rows (o_proj into v_proj)
    for x in iterate(progress, "awq: range clipping per layer group", list(clip_rows)):
        for l in groups[x]:
            w = graph.attr(l.weight_node).detach().float()
            clipped, factor = search_clip(w, clip_rows[x], bits, group, masks.get(l.param))
            result.to_round[l.param] = clipped
            result.info[l.param]["clip_mean_range"] = round(factor, 4)
    graph.graph.lint()
    graph.gm.recompile()   # not commit(): unused weights are dropped once, by the pass, at its end
    return result


__all__ = ["awq_scale", "find_fold", "apply_fold", "insert_input_mul", "fake_quantize",
           "search_scale", "search_clip", "AwqResult", "Fold", "INPUT_MUL"]
