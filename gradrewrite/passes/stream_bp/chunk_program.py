"""Build, per segment, an fx program that computes the segment's outputs for rows [s, e).

Demanded rows are worked out backward from the outputs: a token-wise op needs the same
rows of its inputs, causal attention needs queries s:e and keys/values 0:e, a cumulative
op 0:e, and anything else (position-id or mask construction the analysis does not
follow) is computed in full. A slice is inserted wherever a consumer needs fewer rows
than its producer computed; view/expand sizes along the sequence axis become the chunk
length; and a causal attention whose queries and keys now start at different rows gets
bottom-right aligned causal attention (query row i sees keys 0..s+i, see
``attention.py``), never SDPA's top-left ``is_causal`` default. ``s`` and ``e``
are the program's first two arguments, so one program serves every chunk.

A range is a pair of symbols: start in {"0", "s"}, end in {"e", "T"} (0 <= s <= e <= T).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ...errors import PassError
from ...rewrite.graph import copy_meta, module_path, op_name
from .attention import chunk_causal_attention
from .seq_axis import (CAUSAL, SDPA, SKIPPED, TOKEN_WISE, OpInfo, _CUMULATIVE, _SIZED_VIEWS,
                       sdpa_args, shape_of)

aten = torch.ops.aten
Range = tuple[str, str]
FULL: Range = ("0", "T")
OUT = "<output>"


def union(a: Range | None, b: Range) -> Range:
    if a is None:
        return b
    return ("0" if "0" in (a[0], b[0]) else "s", "T" if "T" in (a[1], b[1]) else "e")


@dataclass
class ChunkProgram:
    gm: fx.GraphModule
    boundary: list[fx.Node]      # inputs computed elsewhere, passed as their rows ...
    boundary_ranges: list[Range]  # ... in this range of their sequence axis
    user_inputs: list[str]       # graph placeholders, by name
    params: list[str]            # trained parameters, by get_attr target
    computed: dict[fx.Node, dict[int, Range]]

    def __call__(self, s: int, e: int, boundary: list, user: list, params: list) -> Any:
        return self.gm(s, e, *boundary, *user, *params)


def _axes(axes_of: dict, node: fx.Node) -> dict[int, tuple[int, int]]:
    ax = axes_of.get(node) or {}
    if isinstance(ax, list):
        merged: dict = {}
        for a in ax:
            merged.update(a)
        return merged
    return ax


def program_nodes(outputs: list[fx.Node], leaves: set[fx.Node], gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes the outputs need, back to the given leaves, in graph order."""
    need = {o for o in outputs if o not in leaves and o.op == "call_function"}
    stack = list(need)
    while stack:
        node = stack.pop()
        for i in node.all_input_nodes:
            if i not in need and i not in leaves and i.op == "call_function":
                need.add(i)
                stack.append(i)
    return [n for n in gm.graph.nodes if n in need and n.target not in SKIPPED]


def demands(order: list[fx.Node], outputs: list[tuple[fx.Node, dict[int, Range]]],
            infos: dict[fx.Node, OpInfo], axes_of: dict) -> tuple[dict, dict]:
    """(computed ranges per node, needed ranges per edge), walking backward."""
    demand: dict[fx.Node, dict[int, Range]] = {}
    edge: dict[tuple[Any, fx.Node], dict[int, Range]] = {}

    def need(consumer: Any, producer: fx.Node, req: dict[int, Range]) -> None:
        req = {a: req.get(a, FULL) for a in _axes(axes_of, producer)}
        edge[(consumer, producer)] = req
        d = demand.setdefault(producer, {})
        for a, r in req.items():
            d[a] = union(d.get(a), r)

    for node, req in outputs:
        need(OUT, node, req)
    full_nodes = set()
    for node in reversed(order):
        info = infos[node]
        comp = {a: demand.get(node, {}).get(a, FULL) for a in _axes(axes_of, node)}
        row_wise = info.kind in (TOKEN_WISE, CAUSAL) and (
            node.target is SDPA or all(m is not None for m in info.in_maps.values()))
        if not row_wise:
            comp = {a: FULL for a in comp}
            full_nodes.add(node)
        elif node.target in _CUMULATIVE:  # row t needs rows 0..t, so it yields rows 0..e
            dim = node.args[1] % len(shape_of(node.args[0]))
            if dim in comp:
                comp[dim] = ("0", comp[dim][1])
        elif info.key_axis is not None and info.probs_of is None:  # attention softmax
            comp[info.key_axis] = union(comp[info.key_axis], key_rows(info, comp[info.key_axis - 1]))
        demand[node] = comp
        for i in node.all_input_nodes:
            if not _axes(axes_of, i):
                continue
            if node.target is operator.getitem:
                need(node, i, comp)
            elif node in full_nodes:
                need(node, i, {})
            elif node.target is SDPA:
                need(node, i, _sdpa_need(node, i, comp, info))
            elif info.probs_of is not None:  # P @ V: probabilities and values at the keys
                need(node, i, _probs_values_need(node, i, comp, info, infos))
            else:
                m = info.in_maps.get(i) or {}
                req = {a: comp[o] for o, a in m.items() if o in comp}
                if node.target in _CUMULATIVE:
                    dim = node.args[1] % len(shape_of(i))
                    if dim in req:
                        req[dim] = ("0", req[dim][1])
                need(node, i, req)
    # A getitem computes whatever its tuple computed; consumers slice from there.
    for node in order:
        if node.target is operator.getitem and node.args[0] in demand:
            demand[node] = {a: demand[node.args[0]].get(a, FULL) for a in demand[node]}
            edge[(node, node.args[0])] = dict(demand[node.args[0]])
    return demand, edge


def key_rows(info: OpInfo, q_rows: Range) -> Range:
    """Keys a chunk of queries reads: 0:e, or every key where the mask check found that
    a fully hidden row (left padding under a finite mask) spreads over all of them."""
    return FULL if info.full_keys else ("0", q_rows[1])


def _probs_values_need(node: fx.Node, i: fx.Node, comp: dict[int, Range], info: OpInfo,
                       infos: dict[fx.Node, OpInfo]) -> dict[int, Range]:
    rank = len(shape_of(node))
    q_rows = comp.get(rank - 2, FULL)
    keys = key_rows(infos[info.probs_of], q_rows)
    a, b = node.args[0], node.args[1]
    if i is a:
        return {info.key_axis - 1: q_rows, info.key_axis: keys}
    if i is b:
        return {len(shape_of(b)) - 2: keys}
    return {}


def _sdpa_need(node: fx.Node, i: fx.Node, comp: dict[int, Range], info: OpInfo) -> dict[int, Range]:
    a = sdpa_args(node)
    row = len(shape_of(a["query"])) - 2
    q_rows = comp.get(row, FULL)
    keys = key_rows(info, q_rows)
    if i is a["query"]:
        return {row: q_rows}
    if i is a["key"] or i is a["value"]:
        return {row: keys}
    rank = len(shape_of(i))
    return {rank - 2: q_rows, rank - 1: keys}


def build(gm: fx.GraphModule, boundary: list[fx.Node],
          outputs: list[tuple[fx.Node, dict[int, Range]]],
          trainable: set[str], infos: dict[fx.Node, OpInfo], axes_of: dict, T: int) -> ChunkProgram:
    """A program computing ``outputs`` (node, rows wanted per sequence axis) from the
    ``boundary`` values, the graph inputs and the weights."""
    order = program_nodes([o for o, _ in outputs], set(boundary), gm)
    computed, edge = demands(order, outputs, infos, axes_of)
    ranges = []
    g = fx.Graph()
    s_node, e_node = g.placeholder("s"), g.placeholder("e")
    env: dict[fx.Node, fx.Node] = {}
    users_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    leaves = {i for n in order for i in n.all_input_nodes if i not in order}
    leaves |= {o for o, _ in outputs if o not in order}
    for b in boundary:
        env[b] = g.placeholder(f"in_{b.name}")
        axes = _axes(axes_of, b)
        if len(axes) != 1 or next(iter(axes.values())) != (1, 1):
            raise PassError(f"stream-bp: {op_name(b)} at {module_path(b)} crosses a chunk "
                            "program boundary without a single sequence axis")
        rng = computed.get(b, {}).get(next(iter(axes)), FULL)
        computed[b] = {next(iter(axes)): rng}
        ranges.append(rng)
    user_names = []
    for p in users_placeholders:
        if p in leaves:
            env[p] = g.placeholder(p.name)
            user_names.append(p.name)
            computed[p] = {a: FULL for a in _axes(axes_of, p)}
    params = []
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n in leaves:
            if str(n.target) in trainable:
                env[n] = g.placeholder(f"p_{n.name}")
                params.append(str(n.target))
            else:
                env[n] = g.get_attr(n.target)
            computed[n] = {}
    missing = [l for l in leaves if l not in env]
    if missing:
        raise PassError(f"stream-bp: internal: segment input {missing[0].name} has no source")
    sym_cache: dict[Any, Any] = {}

    def sym(x: str) -> Any:
        return {"0": 0, "s": s_node, "e": e_node, "T": T}[x]

    def diff(end: str, start: str) -> Any:
        if start == "0":
            return sym(end)
        key = (end, start)
        if key not in sym_cache:
            sym_cache[key] = g.call_function(operator.sub, (sym(end), sym(start)))
        return sym_cache[key]

    def fetch(producer: fx.Node, consumer: Any) -> fx.Node:
        value = env[producer]
        have = computed.get(producer, {})
        want = edge.get((consumer, producer), {})
        for axis, r in want.items():
            h = have.get(axis, FULL)
            if h == r:
                continue
            if _axes(axes_of, producer)[axis] != (1, 1):
                raise PassError(f"stream-bp: cannot narrow a flattened sequence axis of "
                                f"{op_name(producer)} at {module_path(producer)}")
            start = 0 if h[0] == r[0] else sym(r[0])
            end = sym(r[1]) if h[0] == "0" else diff(r[1], h[0])
            value = g.call_function(aten.slice.Tensor, (value, axis, start, end))
            copy_meta(producer, value)
        return value

    for node in order:
        args = fx.map_arg(node.args, lambda p: fetch(p, node))
        kwargs = fx.map_arg(node.kwargs, lambda p: fetch(p, node))
        comp = computed[node]
        if node.target in _SIZED_VIEWS or node.target is aten.expand.default:
            sizes = list(shape_of(node))
            for axis, (outer, inner) in _axes(axes_of, node).items():
                r = comp.get(axis, FULL)
                if r != FULL:
                    length = diff(r[1], r[0])
                    if outer * inner != 1:
                        length = g.call_function(operator.mul, (length, outer * inner))
                    sizes[axis] = length
            args = (args[0], sizes) + tuple(args[2:])
        target = node.target
        if target is SDPA:
            target, args, kwargs = _sdpa_chunk(node, args, kwargs, comp, edge, g)
        new = g.call_function(target, args, kwargs)
        copy_meta(node, new)
        env[node] = new
    outs = [fetch(o, OUT) for o, _ in outputs]
    g.output(tuple(outs))
    prog = fx.GraphModule(gm, g)
    return ChunkProgram(prog, list(boundary), ranges, user_names, params, computed)


def _sdpa_chunk(node: fx.Node, args: tuple, kwargs: dict, comp: dict, edge: dict,
                g: fx.Graph) -> tuple[Any, tuple, dict]:
    a = sdpa_args(node)
    if not a["is_causal"]:
        return SDPA, args, kwargs
    row = len(shape_of(a["query"])) - 2
    q_rows = comp.get(row, FULL)
    k_rows = edge[(node, a["key"])].get(row, FULL)
    if q_rows == k_rows:
        return SDPA, args, kwargs  # square and aligned: the top-left default is right
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    bound = dict(zip(names, args)) | dict(kwargs)
    T = shape_of(node)[row]
    placeholders = {n.name: n for n in g.nodes if n.op == "placeholder"}

    def s_of(x: str) -> Any:
        return {"0": 0, "T": T}.get(x) if x in ("0", "T") else placeholders[x]

    q, k, v = bound["query"], bound["key"], bound["value"]
    call_args = (q, k, v, s_of(q_rows[0]), s_of(q_rows[1]), s_of(k_rows[0]), s_of(k_rows[1]),
                 bound.get("scale"), bool(bound.get("enable_gqa")))
    return chunk_causal_attention, call_args, {}
