"""Static memory planning: liveness over a scheduled graph and an arena allocator.

A *buffer* is one tensor a step of the schedule writes; it lives from the step that
writes it (``start``) to the last step that reads it (``end``, inclusive). The planner
gives every buffer a byte offset in one arena so that no two buffers alive at the same
step overlap in memory. Two strategies:

- ``greedy-by-size``: biggest buffers first, each into the smallest gap left by the
  already placed buffers whose lifetimes overlap it (best fit), else on top;
- ``first-fit``: in schedule order, each at the lowest offset that fits.

In-place reuse: a buffer may declare ``inplace_of=A`` when the step writing it is the
last reader of ``A`` (``A.end == start``), e.g. an elementwise or depthwise op that may
overwrite its input. Such chains are planned as one block at one offset; ``check``
accepts exactly that overlap (the two share the boundary step).

``graph_buffers`` derives buffers from an fx graph whose node order is the schedule:
step ``i`` is the i-th ``call_function`` node, and the graph's ``output`` node is step
``len(steps)``, so returned tensors live to the end. Views and aliases (``view``,
``reshape`` of a contiguous tensor, ``t``, ``transpose``, ``squeeze`` …, ``getitem`` of a
tuple) write nothing: they share their base's buffer and extend its lifetime. An
element of a multi-output op that nobody reads still gets a one-step buffer ``name.i``.
Placeholders and ``get_attr`` weights are owned by the caller and are not in the arena.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import networkx as nx
import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops whose output aliases (a view of) their first input's storage.
VIEW_OPS = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.t.default, aten.transpose.int,
    aten.permute.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.unsqueeze.default, aten.expand.default, aten.alias.default, aten.detach.default,
    aten.slice.Tensor, aten.select.int, aten.as_strided.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.view_as.default, aten.numpy_T.default,
})
# reshape aliases only when it can be a view; a contiguous input always can.
RESHAPE_OPS = frozenset({aten.reshape.default})


@dataclass(frozen=True)
class Buffer:
    name: str                 # unique id, normally the fx node name
    size: int                 # bytes
    start: int                # schedule index of the step that writes it
    end: int                  # schedule index of the last step that reads it (inclusive)
    inplace_of: str | None = None   # may reuse this buffer's storage (its end == this start)

    def lives_at(self, step: int) -> bool:
        return self.start <= step <= self.end

    def overlaps_in_time(self, other: "Buffer") -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass
class MemoryPlan:
    buffers: list[Buffer]
    offsets: dict[str, int]
    arena_bytes: int
    strategy: str
    # fx node name -> name of the buffer holding its value (views map to their base)
    aliases: dict[str, str] = field(default_factory=dict)
    alignment: int = 16

    def offset_of(self, node_name: str) -> int:
        """Arena offset of a node's value (views resolve to their base buffer)."""
        return self.offsets[self.aliases.get(node_name, node_name)]

    def check(self) -> None:
        """Simulate the schedule: no two live buffers may share a byte, except a declared
        in-place pair at its boundary step. Raises AssertionError naming the pair."""
        by_name = {b.name: b for b in self.buffers}
        for b in self.buffers:
            off = self.offsets[b.name]
            assert off >= 0 and off + b.size <= self.arena_bytes, \
                f"buffer {b.name} [{off}, {off + b.size}) lies outside the {self.arena_bytes}-byte arena"
        events = sorted(self.buffers, key=lambda b: (b.start, b.name))
        live: list[Buffer] = []
        for b in events:
            live = [x for x in live if x.end >= b.start]
            lo, hi = self.offsets[b.name], self.offsets[b.name] + b.size
            for x in live:
                xlo, xhi = self.offsets[x.name], self.offsets[x.name] + x.size
                if lo < xhi and xlo < hi and not _shares_legally(b, x, by_name):
                    raise AssertionError(
                        f"buffers {x.name} (steps {x.start}-{x.end}, bytes {xlo}-{xhi}) and "
                        f"{b.name} (steps {b.start}-{b.end}, bytes {lo}-{hi}) are live together "
                        "and overlap in memory")
            live.append(b)

    def peak_live_bytes(self) -> int:
        """Max over steps of the bytes live at that step, counting a valid in-place pair
        once at its boundary: a lower bound on any valid plan's arena."""
        return peak_live_bytes(self.buffers)

    def peak_bytes(self) -> int:
        """The arena actually touched: max over steps of the highest live byte."""
        steps = {b.start for b in self.buffers}
        return max((max(self.offsets[b.name] + b.size for b in self.buffers if b.lives_at(s))
                    for s in steps), default=0)

    def live_bytes_by_step(self) -> list[int]:
        last = max((b.end for b in self.buffers), default=-1)
        return [sum(b.size for b in self.buffers if b.lives_at(s)) for s in range(last + 1)]

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "arena_bytes": self.arena_bytes,
                "peak_live_bytes": self.peak_live_bytes(), "buffers": len(self.buffers),
                "inplace_reuses": sum(1 for b in self.buffers if b.inplace_of
                                      and self.offsets[b.name] == self.offsets[b.inplace_of]),
                "alignment": self.alignment}


def _shares_legally(a: Buffer, b: Buffer, by_name: dict[str, Buffer]) -> bool:
    """``a`` and ``b`` may share storage: one is the in-place successor of the other
    (directly or along a chain) and they meet only at the boundary step."""
    for x, y in ((a, b), (b, a)):
        cur = x
        while cur.inplace_of is not None and cur.inplace_of in by_name:
            prev = by_name[cur.inplace_of]
            if prev.end != cur.start:
                break
            if prev.name == y.name:
                return x.start >= y.end
            cur = prev
    return False


def peak_live_bytes(buffers: Iterable[Buffer]) -> int:
    buffers = list(buffers)
    by_name = {b.name: b for b in buffers}
    starts = sorted({b.start for b in buffers} | {b.end for b in buffers})
    peak = 0
    for s in starts:
        live = [b for b in buffers if b.lives_at(s)]
        total, used = sum(b.size for b in live), set()
        for b in sorted(live, key=lambda b: b.name):  # a valid in-place pair at its
            prev = by_name.get(b.inplace_of) if b.inplace_of else None  # boundary: one storage
            if prev is not None and b.start == s and prev.end == s and prev.name not in used:
                used.add(prev.name)
                total -= min(b.size, prev.size)
        peak = max(peak, total)
    return peak


# ----------------------------------------------------------------------------- planning
def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment if alignment > 1 else n


@dataclass
class _Block:
    """One or more buffers (an in-place chain) placed at one offset."""

    members: list[Buffer]
    size: int
    start: int
    end: int
    offset: int = -1


def _blocks(buffers: list[Buffer], alignment: int) -> list[_Block]:
    by_name = {b.name: b for b in buffers}
    claimed: set[str] = set()
    successor: dict[str, Buffer] = {}
    for b in sorted(buffers, key=lambda b: (b.start, b.name)):
        prev = by_name.get(b.inplace_of) if b.inplace_of else None
        # only when the input dies right here, and only one successor per input
        if prev is not None and prev.end == b.start and prev.name not in claimed \
                and prev.name != b.name:
            claimed.add(prev.name)
            successor[prev.name] = b
    heads = [b for b in buffers if not (b.inplace_of and b.inplace_of in claimed
                                        and successor.get(b.inplace_of) is b)]
    blocks = []
    for head in heads:
        chain = [head]
        while chain[-1].name in successor:
            chain.append(successor[chain[-1].name])
        blocks.append(_Block(chain, max(_align(m.size, alignment) for m in chain),
                             min(m.start for m in chain), max(m.end for m in chain)))
    return blocks


def _place(block: _Block, placed: list[_Block], best_fit: bool) -> int:
    """Lowest (first-fit) or tightest (best-fit) gap among time-overlapping blocks."""
    busy = sorted((p.offset, p.offset + p.size) for p in placed
                  if p.start <= block.end and block.start <= p.end)
    best, best_gap, cursor = None, None, 0
    for lo, hi in busy:
        gap = lo - cursor
        if gap >= block.size:
            if not best_fit:
                return cursor
            if best_gap is None or gap < best_gap:
                best, best_gap = cursor, gap
        cursor = max(cursor, hi)
    return best if best is not None else cursor


def plan_buffers(buffers: list[Buffer], *, strategy: str = "greedy-by-size",
                 alignment: int = 16) -> MemoryPlan:
    """Assign arena offsets to ``buffers`` (see the module docstring)."""
    if strategy not in ("greedy-by-size", "first-fit"):
        raise ValueError(f"unknown strategy {strategy!r}: use greedy-by-size or first-fit")
    names = [b.name for b in buffers]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate buffer names: {', '.join(dup[:5])}")
    blocks = _blocks(list(buffers), alignment)
    if strategy == "greedy-by-size":
        order = sorted(blocks, key=lambda b: (-b.size, b.start, b.members[0].name))
    else:
        order = sorted(blocks, key=lambda b: (b.start, -b.size, b.members[0].name))
    placed: list[_Block] = []
    for block in order:
        block.offset = _place(block, placed, best_fit=strategy == "greedy-by-size")
        placed.append(block)
    offsets = {m.name: b.offset for b in blocks for m in b.members}
    arena = max((b.offset + b.size for b in blocks), default=0)
    return MemoryPlan(list(buffers), offsets, arena, strategy, alignment=alignment)


# ----------------------------------------------------------------------------- liveness
def _is_view(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if node.target in VIEW_OPS:
        return True
    if node.target in RESHAPE_OPS:
        src = node.args[0]
        val = src.meta.get("val") if isinstance(src, fx.Node) else None
        return isinstance(val, torch.Tensor) and val.is_contiguous()
    return False


def tensor_bytes(val: Any) -> int | None:
    if not isinstance(val, torch.Tensor):
        return None
    numel = 1
    for s in val.shape:
        numel *= int(s)
    return numel * val.element_size()


def dependency_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """Node -> user edges of the fx graph (node order is the schedule)."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def _liveness(gm: fx.GraphModule, *, size_of: Callable[[fx.Node], int | None] | None = None,
              inplace: Callable[[fx.Node], fx.Node | None] | None = None,
              skip: Callable[[fx.Node], bool] | None = None) -> tuple[list[Buffer], dict[str, str]]:
    deps = dependency_graph(gm)
    assert nx.is_directed_acyclic_graph(deps), "the graph has a cycle"
    steps = [n for n in gm.graph.nodes if n.op == "call_function"]
    index = {n.name: i for i, n in enumerate(steps)}
    out_step = len(steps)
    for n in gm.graph.nodes:
        if n.op == "output":
            index[n.name] = out_step

    # base buffer of every tensor-valued node; views/getitems resolve to their base
    base: dict[str, str] = {}
    sizes: dict[str, int] = {}
    starts: dict[str, int] = {}
    for node in steps:
        val = node.meta.get("val")
        if _is_view(node):
            src = node.args[0]
            if node.target is operator.getitem and isinstance(src, fx.Node) \
                    and src.name not in base:
                # getitem of a multi-output op: the element is its own buffer, written
                # by the producing step
                size = (size_of(node) if size_of else None) or tensor_bytes(val)
                if size is not None and not (skip and skip(node)):
                    base[node.name] = node.name
                    sizes[node.name] = size
                    starts[node.name] = index[src.name]
                continue
            if isinstance(src, fx.Node) and src.name in base:
                base[node.name] = base[src.name]
            continue
        if skip is not None and skip(node):
            continue
        size = size_of(node) if size_of else None
        if size is None:
            size = tensor_bytes(val)
        if size is None:
            # a tuple producer: its getitems own the elements; an element nobody reads
            # is still written, so it gets a one-step scratch buffer NAME.i
            if isinstance(val, (tuple, list)):
                read = {u.args[1] for u in node.users if u.target is operator.getitem}
                for i, v in enumerate(val):
                    b = tensor_bytes(v)
                    if b and i not in read:
                        name = f"{node.name}.{i}"
                        sizes[name], starts[name], base[name] = b, index[node.name], name
            continue
        base[node.name] = node.name
        sizes[node.name] = size
        starts[node.name] = index[node.name]

    ends = dict(starts)
    for name, owner in base.items():
        for user in (deps.successors(name) if name in deps else ()):
            if user in index:
                ends[owner] = max(ends[owner], index[user])

    inplace_of: dict[str, str] = {}
    if inplace is not None:
        for node in steps:
            if base.get(node.name) != node.name or node.name not in starts:
                continue
            src = inplace(node)
            if src is None or src.name not in base:
                continue
            owner = base[src.name]
            # legal only where the input's storage dies at this very step
            if ends[owner] == starts[node.name] and sizes[node.name] <= sizes[owner] \
                    and owner != node.name:
                inplace_of[node.name] = owner
    buffers = [Buffer(name, sizes[name], starts[name], ends[name], inplace_of.get(name))
               for name in sizes]
    aliases = {n: b for n, b in base.items() if n != b}
    return buffers, aliases


def graph_buffers(gm: fx.GraphModule, *, size_of=None, inplace=None, skip=None) -> list[Buffer]:
    """One Buffer per tensor a step writes (see the module docstring)."""
    return _liveness(gm, size_of=size_of, inplace=inplace, skip=skip)[0]


def plan_graph(gm: fx.GraphModule, *, strategy: str = "greedy-by-size", alignment: int = 16,
               size_of=None, inplace=None, skip=None) -> MemoryPlan:
    buffers, aliases = _liveness(gm, size_of=size_of, inplace=inplace, skip=skip)
    plan = plan_buffers(buffers, strategy=strategy, alignment=alignment)
    plan.aliases = aliases
    return plan


# Elementwise ops whose output may overwrite an input that dies at that step.
ELEMENTWISE_INPLACE = frozenset({
    aten.relu.default, aten.hardtanh.default, aten.clamp.default, aten.add.Tensor,
    aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.sigmoid.default,
    aten.tanh.default, aten.gelu.default, aten.silu.default, aten.neg.default,
    aten.threshold_backward.default, aten.hardtanh_backward.default, aten.add.Scalar,
    aten.where.self, aten.le.Scalar, aten.sub.Scalar,
})


def default_inplace(node: fx.Node) -> fx.Node | None:
    """Elementwise ops may write over their first same-shaped tensor input."""
    if node.target not in ELEMENTWISE_INPLACE:
        return None
    out = node.meta.get("val")
    for arg in node.args:
        if isinstance(arg, fx.Node):
            val = arg.meta.get("val")
            if isinstance(val, torch.Tensor) and isinstance(out, torch.Tensor) \
                    and val.shape == out.shape and val.dtype == out.dtype:
                return arg
    return None


def _node_role(node: fx.Node) -> str:
    return (node.meta.get("custom") or {}).get("train_role", "")


def memory_report(graph, *, strategy: str = "greedy-by-size", inplace=default_inplace,
                  size_of=None, weight_bytes_per_elem: dict[str, float] | None = None) -> dict[str, Any]:
    """Peak memory of a (training-step or inference) ``Graph``, split three ways:

    - ``trained_weights_bytes`` (SRAM): parameters the step updates, plus momentum;
      each update is written in place into them, so update outputs are not in the arena;
    - ``frozen_weights_bytes`` (flash): every other weight/constant;
    - ``arena_bytes`` (SRAM): activations and gradients, planned by ``plan_graph``;
    - ``inputs_bytes``: the batch (inputs and labels), owned by the caller.

    ``sram_bytes`` = trained weights + arena + inputs is the training step's peak SRAM.
    """
    ts = graph.meta.get("train_step") or {}
    trained = {info["attr"]: info for info in ts.get("params", {}).values() if info.get("trained")}
    momentum = {f"{a}_momentum" for a in trained}
    per_elem = weight_bytes_per_elem or {}
    trained_b = frozen_b = 0
    seen: set[str] = set()
    for node in graph.graph.nodes:
        if node.op != "get_attr" or str(node.target) in seen:
            continue
        seen.add(str(node.target))
        val = node.meta.get("val")
        size = tensor_bytes(val)
        if size is None:
            continue
        if str(node.target) in trained or str(node.target) in momentum:
            info = trained.get(str(node.target).removesuffix("_momentum"), {})
            part = size * info["rows"] // info["shape"][0] if info.get("rows") else size
            trained_b += part  # partial-channel layers keep only their trained rows in SRAM
            frozen_b += size - part
        else:
            scale = per_elem.get("frozen")
            frozen_b += int(size / val.element_size() * scale) if scale else size
    updates = lambda n: bool((n.meta.get("custom") or {}).get("writes"))  # noqa: E731
    plan = plan_graph(graph.gm, strategy=strategy, inplace=inplace, size_of=size_of, skip=updates)
    plan.check()
    inputs_b = sum(tensor_bytes(n.meta.get("val")) or 0 for n in graph.graph.nodes if n.op == "placeholder")
    return {"strategy": strategy, "arena_bytes": plan.arena_bytes,
            "peak_live_bytes": plan.peak_live_bytes(),
            "trained_weights_bytes": trained_b, "frozen_weights_bytes": frozen_b,
            "inputs_bytes": inputs_b, "sram_bytes": plan.arena_bytes + trained_b + inputs_b,
            "buffers": len(plan.buffers), "inplace_reuses": plan.as_dict()["inplace_reuses"]}
