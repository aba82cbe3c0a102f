"""Where the sequence axis is, node by node, and how each op mixes tokens.

Every tensor in a causal LM's graph carries zero, one or two *sequence axes*: the
hidden states ``B x T x D`` one, an attention mask ``B x 1 x T x T`` two (queries,
keys). An axis is recorded as ``axis -> (outer, inner)``: the dimension holds
``outer * T * inner`` elements in that order, so ``B*T`` rows flattened for ``addmm``
are still tracked (``outer = B``).

Each op gets a *kind*, decided from the op and the axes it touches, never from the
model family:

- ``token-wise``: output row t depends on input row t only (pointwise, views,
  reductions over other axes, linear layers, embedding lookups);
- ``causal``: output row t depends on input rows 0..t (causal attention, fused or
  written as matmul -> softmax -> matmul, cumulative ops along the sequence);
- ``global``: output row t may depend on later rows (non-causal attention, reductions
  over the sequence, matmuls contracting it);
- ``opaque``: an op this module does not know touching a sequence axis;
- ``static``: no sequence axis anywhere (weights, constants).

Attention written out (``attn_implementation="eager"``) is followed as data: ``Q @ K^T``
gives a tensor with a query and a key axis (each entry depends on one query row and
one key row, so it is token-wise on both), scale / soft-cap / mask / ALiBi additions are
pointwise on it, the softmax over the key axis is causal once the mask is shown to hide
every later key (checked on the mask's values at capture), and ``P @ V`` contracts the
key axis against the value rows of that softmax only.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten
Axes = dict[int, tuple[int, int]]

TOKEN_WISE, CAUSAL, GLOBAL, OPAQUE, STATIC = "token-wise", "causal", "global", "opaque", "static"

_POINTWISE_EXTRA = {
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.lift_fresh_copy.default, aten.type_as.default, aten.masked_fill.Scalar,
    aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther,
    aten.gelu.default, aten.silu.default, aten.relu.default, aten.zeros_like.default,
    aten.ones_like.default, aten.full_like.default, aten.empty_like.default,
}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
          aten.flatten.using_ints, aten.unflatten.int}
VIEWS = _VIEWS
_SIZED_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
               aten.var.correction, aten.std.correction, aten.any.dim, aten.argmax.default,
               aten.logsumexp.default, aten.norm.ScalarOpt_dim}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
            aten._log_softmax.default}
_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
_MATMULS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default,
            aten.bmm.default, aten.baddbmm.default}
_CUMULATIVE = {aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default,
               aten.cummax.default, aten.cummin.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
           aten.unbind.int}
_FACTORIES = {aten.arange.default, aten.arange.start, aten.arange.start_step,
              aten.ones.default, aten.zeros.default, aten.full.default, aten.empty.memory_format,
              aten.new_ones.default, aten.new_zeros.default, aten.new_full.default,
              aten.new_empty.default, aten.scalar_tensor.default}
SKIPPED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default}
SDPA = aten.scaled_dot_product_attention.default
DROPOUT = aten.dropout.default


@dataclass
class OpInfo:
    """How one node relates to the sequence: its kind, its output's sequence axes, and
    for each tensor input the map output axis -> input axis (``None``: no row-wise map)."""

    kind: str
    out: Axes | list[Axes]
    in_maps: dict[fx.Node, dict[int, int] | None] = field(default_factory=dict)
    reason: str = ""
    # attention (fused, or softmax over the key axis and the P @ V that reads it):
    key_axis: int | None = None       # the key axis of the softmax / of P in P @ V
    probs_of: fx.Node | None = None   # P @ V: the softmax whose probabilities it reads
    full_keys: bool = False           # set by the mask check: keys 0:T, not 0:e, per chunk


def is_pointwise(target: Any) -> bool:
    return target in _POINTWISE_EXTRA or (
        isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)


def shape_of(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if shape_of(a) is not None or a.op == "placeholder"]


def _norm(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _sized_axes(shape: tuple[int, ...], T: int) -> Axes:
    return {i: (1, 1) for i, s in enumerate(shape) if s == T}


def _broadcast_map(inp: tuple[int, ...], out: tuple[int, ...], axes: Axes) -> dict[int, int]:
    shift = len(out) - len(inp)
    return {a + shift: a for a in axes if inp[a] == out[a + shift]}


def _expands_queries(inp: tuple[int, ...] | None, out: tuple[int, ...], axes: Axes, T: int) -> bool:
    """``expand`` of a padding mask over keys (``.., 1, T``) to ``.., T, T`` (transformers
    4.4x): the new rows are the query axis."""
    r = len(out)
    return (inp is not None and r >= 2 and set(axes) == {r - 1} and out[r - 2] == T
            and (len(inp) < 2 or inp[-2] == 1))


def _view_map(inp: tuple[int, ...], out: tuple[int, ...], axes: Axes,
              T: int) -> tuple[dict[int, int], Axes] | None:
    """Follow each sequence block through a reshape by its flat offset."""
    mapping, out_axes = {}, {}
    for a, (outer, inner) in axes.items():
        pre = math.prod(inp[:a]) * outer
        size = pre * T
        for j in range(len(out)):
            lo, hi = math.prod(out[:j]), math.prod(out[:j + 1])
            if lo <= pre and hi >= size and pre % lo == 0 and hi % size == 0:
                o = pre // lo
                if out[j] % (o * T):
                    return None
                mapping[j] = a
                out_axes[j] = (o, out[j] // (o * T))
                break
        else:
            return None
    return mapping, out_axes


def analyse(node: fx.Node, axes_of: dict[fx.Node, Any], T: int) -> OpInfo:
    """Classify ``node`` given its inputs' sequence axes (``axes_of``)."""
    target = node.target
    out_shape = shape_of(node)
    ins = _tensor_inputs(node)
    in_axes = {i: axes_of.get(i) or {} for i in ins}
    if node.op != "call_function":
        return OpInfo(STATIC, {})
    if target is operator.getitem:
        src, idx = node.args
        axes = axes_of.get(src)
        if isinstance(axes, list):
            chosen = axes[idx] if idx < len(axes) else {}
            return OpInfo(TOKEN_WISE if chosen else STATIC, dict(chosen),
                          {src: {a: a for a in chosen}})
        return OpInfo(STATIC, {})
    if target in _FACTORIES:
        return OpInfo(STATIC, _sized_axes(out_shape or (), T)) if out_shape else OpInfo(STATIC, {})
    if not any(in_axes.values()):
        return OpInfo(STATIC, {})
    rank = len(out_shape) if out_shape is not None else 0

    def opaque(reason: str, kind: str = OPAQUE) -> OpInfo:
        val = node.meta.get("val")
        if isinstance(val, (list, tuple)):
            out: Any = [_sized_axes(tuple(v.shape), T) if isinstance(v, torch.Tensor) else {}
                        for v in val]
        else:
            out = _sized_axes(out_shape, T) if out_shape is not None else {}
        return OpInfo(kind, out, {i: None for i in ins}, reason)

    if target is DROPOUT:
        p, train = node.args[1], node.args[2]
        if train and p > 0:
            return opaque("dropout is random, so recomputing a chunk would draw new masks")
        target = aten.alias.default
    if is_pointwise(target) or target in (aten.expand.default, aten.cat.default):
        if target is aten.cat.default:
            dim = _norm(node.args[1] if len(node.args) > 1 else 0, rank)
            if any(dim in ax for ax in in_axes.values()):
                return opaque("concatenates along the sequence axis")
        maps, out = {}, {}
        for i, ax in in_axes.items():
            shp = shape_of(i)
            if shp is None:
                continue
            m = _broadcast_map(shp, out_shape, ax)
            if len(m) != len(ax):
                return opaque("broadcasts a sequence axis")
            maps[i] = m
            for o, a in m.items():
                if out.setdefault(o, ax[a]) != ax[a]:
                    return opaque("mixes differently flattened sequence axes")
        if target is aten.expand.default and _expands_queries(shape_of(node.args[0]), out_shape, out, T):
            out[rank - 2] = (1, 1)  # a key mask (.., 1, T) expanded to queries x keys
        return OpInfo(TOKEN_WISE, out, maps)
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    src_axes = in_axes.get(src, {}) if src is not None else {}
    src_shape = shape_of(src) if src is not None else None
    if target in _VIEWS:
        got = _view_map(src_shape, out_shape, src_axes, T)
        if got is None:
            return opaque("reshapes the sequence axis into other axes")
        mapping, out = got
        return OpInfo(TOKEN_WISE, out, {src: mapping})
    if target in (aten.transpose.int, aten.permute.default, aten.t.default):
        r = len(src_shape)
        if target is aten.permute.default:
            perm = [_norm(d, r) for d in node.args[1]]
        else:
            d0, d1 = (0, 1) if target is aten.t.default else (_norm(node.args[1], r), _norm(node.args[2], r))
            perm = list(range(r))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        mapping = {o: a for o, a in enumerate(perm) if a in src_axes}
        return OpInfo(TOKEN_WISE, {o: src_axes[a] for o, a in mapping.items()}, {src: mapping})
    if target in (aten.slice.Tensor, aten.select.int, aten.narrow.default):
        dim = _norm(node.args[1] if len(node.args) > 1 else 0, len(src_shape))
        if dim in src_axes:
            start = node.args[2] if len(node.args) > 2 else 0
            end = node.args[3] if len(node.args) > 3 else None
            step = node.args[4] if len(node.args) > 4 else 1
            if target is aten.slice.Tensor and start in (0, None) and step == 1 and (
                    end is None or end >= src_shape[dim]):
                return OpInfo(TOKEN_WISE, dict(src_axes), {src: {a: a for a in src_axes}})
            return opaque("takes a fixed part of the sequence")
        drop = target is aten.select.int
        mapping = {(a - 1 if drop and a > dim else a): a for a in src_axes}
        return OpInfo(TOKEN_WISE, {o: src_axes[a] for o, a in mapping.items()}, {src: mapping})
    if target in _SPLITS:
        dim = _norm(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), len(src_shape)) \
            if target is not aten.unbind.int else _norm(node.args[1] if len(node.args) > 1 else 0, len(src_shape))
        if dim in src_axes:
            return opaque("splits the sequence axis")
        n = len(node.meta.get("val") or ())
        if target is aten.unbind.int:
            mapping = {(a - 1 if a > dim else a): a for a in src_axes}
            return OpInfo(TOKEN_WISE, [{o: src_axes[a] for o, a in mapping.items()}] * n, {src: mapping})
        return OpInfo(TOKEN_WISE, [dict(src_axes)] * n, {src: {a: a for a in src_axes}})
    if target in _SOFTMAX and _norm(node.args[1], len(src_shape)) in src_axes and len(src_axes) == 2:
        return _analyse_attention_softmax(node, src, src_axes, len(src_shape))
    if target in _REDUCTIONS or target in _SOFTMAX or target in _CUMULATIVE:
        r = len(src_shape)
        if target in _SOFTMAX or target in _CUMULATIVE:
            dims, keep = [_norm(node.args[1], r)], True
        else:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = list(range(r)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
            dims = [_norm(d, r) for d in dims]
            keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        if target in _CUMULATIVE and dims[0] in src_axes:
            kind = CAUSAL
        elif any(d in src_axes for d in dims):
            return opaque("reduces over the sequence axis", GLOBAL)
        else:
            kind = TOKEN_WISE
        mapping = {(a if keep else a - sum(d < a for d in dims)): a for a in src_axes}
        out = {o: src_axes[a] for o, a in mapping.items()}
        if target in (aten.cummax.default, aten.cummin.default):
            out = [out, out]
        return OpInfo(kind, out, {src: mapping})
    if target in _NORMS:
        r = len(src_shape)
        n_norm = len(node.args[1])
        if any(a >= r - n_norm for a in src_axes):
            return opaque("normalises over the sequence axis", GLOBAL)
        mapping = {a: a for a in src_axes}
        out = dict(src_axes)
        if target is aten.native_layer_norm.default:
            out = [out, out, out]
        return OpInfo(TOKEN_WISE, out, {src: mapping} | {i: {} for i in ins if i is not src})
    if target in _MATMULS:
        a_node, b_node = (node.args[1], node.args[2]) if target in (aten.addmm.default, aten.baddbmm.default) \
            else (node.args[0], node.args[1])
        a_axes, b_axes = in_axes.get(a_node, {}), in_axes.get(b_node, {})
        a_rank = len(shape_of(a_node))
        if b_axes and target in SCORE_MATMULS:
            return _analyse_attention_matmul(node, a_node, b_node, a_axes, b_axes, rank, ins, T, in_axes)
        if b_axes or (a_rank - 1) in a_axes:
            return opaque("contracts over the sequence axis (attention written as a matmul)", GLOBAL)
        shift = rank - a_rank
        mapping = {a + shift: a for a in a_axes}
        maps = {a_node: mapping} | {i: {} for i in ins if i is not a_node}
        return OpInfo(TOKEN_WISE, {o: a_axes[a] for o, a in mapping.items()}, maps)
    if target is aten.embedding.default:
        idx = node.args[1]
        ax = in_axes.get(idx, {})
        return OpInfo(TOKEN_WISE, dict(ax), {idx: {a: a for a in ax}, node.args[0]: {}})
    if target is SDPA:
        return _analyse_sdpa(node, in_axes, T)
    return opaque("is not known to act row by row")


SCORE_MATMULS = (aten.matmul.default, aten.bmm.default, aten.baddbmm.default)
_PASS_THROUGH = {aten.to.dtype, aten._to_copy.default, aten.alias.default, aten.clone.default,
                 aten.contiguous.default, aten.type_as.default}


def _unit(axes: Axes, *dims: int) -> bool:
    return set(axes) == set(dims) and all(axes[d] == (1, 1) for d in dims)


def _analyse_attention_softmax(node: fx.Node, src: fx.Node, axes: Axes, rank: int) -> OpInfo:
    """Softmax over the key axis of ``queries x keys`` scores: causal once the mask check
    shows every later key hidden (``reason`` says what is left to check)."""
    key = _norm(node.args[1], rank)
    if key != rank - 1 or not _unit(axes, rank - 2, rank - 1):
        return OpInfo(GLOBAL, dict(axes), {src: None}, "reduces over the sequence axis")
    return OpInfo(CAUSAL, dict(axes), {src: {a: a for a in axes}}, "needs a causal mask",
                  key_axis=key)


def attention_probs(node: fx.Node) -> fx.Node | None:
    """The attention softmax whose output ``node`` is (through casts, views and p=0
    dropout; the caller checks that queries and keys are still the last two axes)."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in _SOFTMAX:
            return node
        if node.target in _PASS_THROUGH or node.target in _VIEWS or (
                node.target is DROPOUT and not (node.args[2] and node.args[1])):
            node = node.args[0]
            continue
        return None
    return None


def key_operand(scores: fx.Node) -> fx.Node:
    """The ``K^T`` operand of a ``Q @ K^T`` matmul."""
    return scores.args[2] if scores.target is aten.baddbmm.default else scores.args[1]


def _analyse_attention_matmul(node: fx.Node, a: fx.Node, b: fx.Node, a_axes: Axes, b_axes: Axes,
                              rank: int, ins: list[fx.Node], T: int, in_axes: dict) -> OpInfo:
    """``Q @ K^T`` (query rows x key columns: token-wise on both axes) or ``P @ V`` (the
    key axis of an attention softmax against the value rows: causal as that softmax is)."""
    a_rank, b_rank = len(shape_of(a)), len(shape_of(b))
    others = {i: {} for i in ins if i is not a and i is not b}
    bias = node.args[0] if node.target is aten.baddbmm.default else None
    if bias is not None and bias in in_axes:  # baddbmm: a bias (ALiBi) added to the scores
        others[bias] = _broadcast_map(shape_of(bias), shape_of(node), in_axes[bias])
        if len(others[bias]) != len(in_axes[bias]):
            return OpInfo(OPAQUE, _sized_axes(shape_of(node), T), {i: None for i in ins},
                          "broadcasts a sequence axis")
    if _unit(a_axes, a_rank - 2) and _unit(b_axes, b_rank - 1):
        return OpInfo(TOKEN_WISE, {rank - 2: (1, 1), rank - 1: (1, 1)},
                      {a: {rank - 2: a_rank - 2}, b: {rank - 1: b_rank - 1}} | others)
    probs = attention_probs(a)
    if _unit(a_axes, a_rank - 2, a_rank - 1) and _unit(b_axes, b_rank - 2) and probs is not None:
        return OpInfo(CAUSAL, {rank - 2: (1, 1)}, {a: {rank - 2: a_rank - 2}, b: {}} | others,
                      key_axis=a_rank - 1, probs_of=probs)
    return OpInfo(GLOBAL, _sized_axes(shape_of(node), T), {i: None for i in ins},
                  "contracts over the sequence axis (not the key axis of a causal softmax)")


def sdpa_args(node: fx.Node) -> dict[str, Any]:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    defaults = [None, None, None, None, 0.0, False, None, False]
    out = dict(zip(names, defaults))
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _analyse_sdpa(node: fx.Node, in_axes: dict[fx.Node, Axes], T: int) -> OpInfo:
    a = sdpa_args(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    rank = len(shape_of(q))
    row = rank - 2
    for t in (q, k, v):
        if set(in_axes.get(t, {})) != {row} or in_axes[t][row] != (1, 1):
            return OpInfo(OPAQUE, _sized_axes(shape_of(node), T), {i: None for i in in_axes},
                          "attends over an axis that is not the sequence")
    if a["dropout_p"]:
        return OpInfo(OPAQUE, {row: (1, 1)}, {i: None for i in in_axes},
                      "uses attention dropout, which recomputation cannot replay")
    info = OpInfo(CAUSAL, {row: (1, 1)}, {q: {row: row}, k: None, v: None})
    if mask is not None:
        info.in_maps[mask] = None
    if not a["is_causal"]:
        if mask is None:
            info.kind, info.reason = GLOBAL, "is non-causal attention (no mask, is_causal=False)"
        else:
            info.reason = "needs a causal mask"  # checked on the mask's values at capture
    return info


def track(gm: fx.GraphModule, seq_inputs: dict[str, int]) -> tuple[dict[fx.Node, Any], dict[fx.Node, OpInfo], int]:
    """Sequence axes and op kinds for every node. ``seq_inputs``: placeholder name ->
    its sequence axis (e.g. ``{"input_ids": 1}``)."""
    axes_of: dict[fx.Node, Any] = {}
    infos: dict[fx.Node, OpInfo] = {}
    T = None
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in seq_inputs:
            T = shape_of(node)[seq_inputs[node.name]]
            break
    if T is None:
        raise ValueError("no sequence input")
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            ax = seq_inputs.get(node.name)
            axes_of[node] = {ax: (1, 1)} if ax is not None else {}
            infos[node] = OpInfo(TOKEN_WISE if ax is not None else STATIC, axes_of[node])
        elif node.op == "call_function" and node.target not in SKIPPED:
            info = analyse(node, axes_of, T)
            infos[node] = info
            axes_of[node] = info.out
        else:
            axes_of[node] = {}
            infos[node] = OpInfo(STATIC, {})
    return axes_of, infos, T
