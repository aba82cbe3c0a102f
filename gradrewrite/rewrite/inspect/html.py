"""A self-contained HTML page for one graph, or a before/after pair with a diff.

Everything is inline: CSS, JS, the graph data (as JSON) and the drawing (as SVG laid
out here in Python, so the page needs neither graphviz nor any network access). The
layout is a layered (Sugiyama-style) one:

1. layers by longest path from the inputs (sources without inputs sit right above
   their first user);
2. an edge that skips layers is routed through a chain of "dummy" points, one chain
   per source shared by all its far users (long residual and mask edges then run as
   one clean line instead of cutting through nodes); past a size budget the longest
   ones are drawn as plain curves instead;
3. node order within a layer by barycenter sweeps, keeping the order with the fewest
   crossings;
4. x positions by Brandes & Köpf's coordinate assignment (four median alignments,
   balanced), which keeps long edges straight and repeated blocks from drifting.

All of it is linear or n log n per sweep, with a fixed number of sweeps.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from .describe import DRAWN_OPS, kind_color, short_dims, short_op, weight_summary
from .diff import STATUSES, op_changes, summary_line

ASSETS = Path(__file__).resolve().parent.parent / "inspect_assets"

NODE_H = 46
LAYER_PITCH = 76
MIN_W, MAX_W = 96, 236
GAP = 18
DUMMY_W = 6
MARGIN = 40
SWEEPS = 8


# ---------------------------------------------------------------- layout
@dataclass
class Layout:
    """Positions (centers) of drawn nodes, edge paths and module group boxes."""

    pos: dict[str, tuple[float, float]] = field(default_factory=dict)
    size: dict[str, tuple[float, float]] = field(default_factory=dict)
    edges: list[tuple[str, str, str, str]] = field(default_factory=list)  # d, src, dst, class
    groups: list[tuple[str, float, float, float, float]] = field(default_factory=list)
    lines: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    width: float = 0.0
    height: float = 0.0


def node_lines(node: dict, nodes: dict[str, dict]) -> tuple[str, str, str]:
    """The three text lines of a drawn node: op, shape (+weights), module path."""
    if node["op"] == "placeholder":
        first = f"input {node['id']}"
    elif node["op"] == "output":
        first = "output"
    else:
        first = short_op(node)
    second = short_dims(node["shape"])
    if node.get("dtype") and node["dtype"] != "float32" and second:
        second += f" {node['dtype']}"
    folded = weight_summary(node, nodes) if node["op"] == "call_function" else ""
    if folded:
        second = f"{second} · {folded}" if second else folded
    return first, second, node["module"]


def _fit(text: str, px_per_char: float, *, left: bool = False) -> str:
    """Cut ``text`` to fit a node of the widest size (``…`` marks the cut)."""
    room = int((MAX_W - 20) / px_per_char)
    if len(text) <= room:
        return text
    return "…" + text[-(room - 1):] if left else text[:room - 1] + "…"


def _node_width(lines: tuple[str, str, str]) -> float:
    first, second, third = lines
    w = max(len(first) * 7.6, len(second) * 6.3, len(third) * 6.0) + 22
    return max(MIN_W, min(MAX_W, w))


def compute_layout(desc: dict) -> Layout:
    nodes = {n["id"]: n for n in desc["nodes"]}
    vis = [n for n in desc["nodes"] if n["op"] in DRAWN_OPS]
    n = len(vis)
    index = {node["id"]: i for i, node in enumerate(vis)}
    preds = [[index[a] for a in node["args"] if a in index] for node in vis]
    succs: list[list[int]] = [[] for _ in range(n)]
    for v, ps in enumerate(preds):
        for u in ps:
            succs[u].append(v)
    order = _topo_order(preds, succs)

    layer = [0] * n
    for v in order:
        layer[v] = 1 + max((layer[u] for u in preds[v]), default=-1)
    for v in order:  # constants and late inputs: right above their first user
        if not preds[v] and succs[v]:
            layer[v] = min(layer[s] for s in succs[v]) - 1

    lines = {}
    width = []
    for node in vis:
        raw = node_lines(node, nodes)
        lines[node["id"]] = (_fit(raw[0], 7.6), _fit(raw[1], 6.3), _fit(raw[2], 6.0, left=True))
        width.append(_node_width(lines[node["id"]]))

    # Layout graph: real nodes then dummy chains. lp/ls: neighbours one layer away.
    lw = list(width)
    llayer = list(layer)
    lp: list[list[int]] = [[] for _ in range(n)]
    ls: list[list[int]] = [[] for _ in range(n)]
    key = [float(i) for i in range(n)]
    chains: dict[int, list[int]] = {}
    spans = {u: max(layer[s] for s in succs[u]) - layer[u] for u in range(n) if succs[u]}
    # Dummy points cost layout time; past the budget the longest edges go direct.
    budget = 8 * n + 2000
    direct: set[int] = set()
    dummies = sum(max(0, s - 1) for s in spans.values())
    for u in sorted(spans, key=lambda u: -spans[u]):
        if dummies <= budget:
            break
        direct.add(u)
        dummies -= max(0, spans[u] - 1)
    for u in range(n):
        if u in direct or spans.get(u, 0) <= 1:
            continue
        chain = []
        prev = u
        for lay in range(layer[u] + 1, layer[u] + spans[u]):
            d = len(lw)
            lw.append(DUMMY_W)
            llayer.append(lay)
            lp.append([prev])
            ls.append([])
            ls[prev].append(d)
            key.append(u + 0.5)
            chain.append(d)
            prev = d
        chains[u] = chain
    for v in range(n):
        for u in preds[v]:
            span = layer[v] - layer[u]
            if span == 1:
                lp[v].append(u)
                ls[u].append(v)
            elif u in chains:
                d = chains[u][span - 2]
                lp[v].append(d)
                ls[d].append(v)

    total = len(lw)
    nlayers = max(llayer, default=-1) + 1
    layers: list[list[int]] = [[] for _ in range(nlayers)]
    for v in sorted(range(total), key=lambda v: key[v]):
        layers[llayer[v]].append(v)

    layers = _order_layers(layers, lp, ls)
    dummy = [v >= n for v in range(total)]
    x = _assign_x(layers, lp, ls, lw, dummy)

    out = Layout()
    xs = [x[v] - lw[v] / 2 for v in range(total)] or [0.0]
    xe = [x[v] + lw[v] / 2 for v in range(total)] or [0.0]
    shift = MARGIN - min(xs)
    ycenter = [MARGIN + 14 + NODE_H / 2 + llayer[v] * LAYER_PITCH for v in range(total)]
    px = [x[v] + shift for v in range(total)]
    for i, node in enumerate(vis):
        out.pos[node["id"]] = (round(px[i], 1), round(ycenter[i], 1))
        out.size[node["id"]] = (round(width[i], 1), NODE_H)
    out.width = round(max(xe) + shift + MARGIN, 1)
    out.height = round(MARGIN + 14 + nlayers * LAYER_PITCH + MARGIN, 1)

    def top(v: int) -> tuple[float, float]:
        return px[v], ycenter[v] - NODE_H / 2

    def bottom(v: int) -> tuple[float, float]:
        return px[v], ycenter[v] + NODE_H / 2

    ids = [node["id"] for node in vis]
    for u, chain in chains.items():
        pts = [bottom(u)]
        for d in chain:
            pts += [top(d), bottom(d)]
        out.edges.append((_path(pts), ids[u], "", "edge trunk"))
    for v in range(n):
        for u in preds[v]:
            span = layer[v] - layer[u]
            if span == 1:
                out.edges.append((_path([bottom(u), top(v)]), ids[u], ids[v], "edge"))
            elif u in chains:
                d = chains[u][span - 2]
                out.edges.append((_path([bottom(d), top(v)]), ids[u], ids[v], "edge"))
            else:
                out.edges.append((_long_path(bottom(u), top(v)), ids[u], ids[v], "edge long"))
    out.groups = _groups(vis, out)
    out.lines = lines
    return out


def _topo_order(preds: list[list[int]], succs: list[list[int]]) -> list[int]:
    if all(u < v for v, ps in enumerate(preds) for u in ps):
        return list(range(len(preds)))  # FX graphs are already in topological order
    indeg = [len(set(ps)) for ps in preds]
    ready = [v for v, d in enumerate(indeg) if d == 0]
    order = []
    while ready:
        v = ready.pop()
        order.append(v)
        for s in dict.fromkeys(succs[v]):
            indeg[s] -= 1
            if indeg[s] == 0:
                ready.append(s)
    if len(order) < len(preds):  # a cycle cannot come from FX; draw it anyway
        order += [v for v in range(len(preds)) if v not in set(order)]
    return order


def _order_layers(layers: list[list[int]], lp: list[list[int]], ls: list[list[int]]
                  ) -> list[list[int]]:
    pos = {}
    for lay in layers:
        for i, v in enumerate(lay):
            pos[v] = i
    best = [list(lay) for lay in layers]
    best_cross = _crossings(layers, ls, pos)
    for sweep in range(SWEEPS):
        down = sweep % 2 == 0
        rng = range(1, len(layers)) if down else range(len(layers) - 2, -1, -1)
        for li in rng:
            lay = layers[li]
            nb = lp if down else ls

            def bary(v: int) -> float:
                if not nb[v]:
                    return pos[v]
                return sum(pos[u] for u in nb[v]) / len(nb[v])
            lay.sort(key=lambda v: (bary(v), pos[v]))
            for i, v in enumerate(lay):
                pos[v] = i
        cross = _crossings(layers, ls, pos)
        if cross < best_cross:
            best_cross, best = cross, [list(lay) for lay in layers]
        if best_cross == 0:
            break
    return best


def _crossings(layers: list[list[int]], ls: list[list[int]], pos: dict[int, int]) -> int:
    """Edge crossings between adjacent layers (inversion count with a Fenwick tree)."""
    total = 0
    for lay in layers[:-1]:
        targets = sorted(((pos[v], pos[w]) for v in lay for w in ls[v]))
        ys = [t for _, t in targets]
        size = max(ys, default=0) + 2
        tree = [0] * size
        seen = 0
        for y in ys:
            i, below = y + 1, 0
            while i > 0:
                below += tree[i]
                i -= i & -i
            total += seen - below
            i = y + 1
            while i < size:
                tree[i] += 1
                i += i & -i
            seen += 1
    return total


def _assign_x(layers: list[list[int]], lp: list[list[int]], ls: list[list[int]],
              lw: list[float], dummy: list[bool]) -> list[float]:
    """x coordinates by Brandes & Köpf ("Fast and simple horizontal coordinate
    assignment", as implemented by dagre): four alignments (up/down x left/right),
    each aligning nodes with their median neighbours into vertical blocks that are
    then packed; the result is the average of the two middle candidates per node.
    Long edges (dummy chains) come out straight and repeated structures do not drift.
    Side inputs (sources next to a node that also has a non-source input) take no part
    in the alignment.
    """
    total = len(lw)
    order = [0] * total
    for lay in layers:
        for i, v in enumerate(lay):
            order[v] = i
    conflicts = _type1_conflicts(layers, lp, order, dummy)
    # Side inputs (sources such as a quantized weight's dequantize, beside a node that
    # also reads the main flow) must not pull the flow into their column: aligned with
    # them in half of the four passes, every block would step sideways by a node.
    side: set[tuple[int, int]] = set()
    for v in range(total):
        sources = [u for u in lp[v] if not lp[u]]
        if sources and len(sources) < len(lp[v]):
            side.update((u, v) for u in sources)
    up = [[u for u in lp[v] if (u, v) not in side] for v in range(total)]
    down = [[v for v in ls[u] if (u, v) not in side] for u in range(total)]
    candidates: list[tuple[str, list[float]]] = []
    for vert in "ud":
        base = layers if vert == "u" else layers[::-1]
        neighbours = up if vert == "u" else down
        for horiz in "lr":
            adjusted = base if horiz == "l" else [lay[::-1] for lay in base]
            root = _vertical_alignment(adjusted, conflicts, neighbours, total)
            xs = _horizontal_compaction(adjusted, root, lw, dummy, total)
            if horiz == "r":
                xs = [-x for x in xs]
            candidates.append((horiz, xs))

    def extent(xs: list[float]) -> tuple[float, float]:
        return (min(x - w / 2 for x, w in zip(xs, lw)), max(x + w / 2 for x, w in zip(xs, lw)))

    if not total:
        return []
    lo, hi = min((extent(xs) for _, xs in candidates), key=lambda e: e[1] - e[0])
    aligned = []
    for horiz, xs in candidates:
        e = extent(xs)
        delta = lo - e[0] if horiz == "l" else hi - e[1]
        aligned.append([x + delta for x in xs])
    out = []
    for v in range(total):
        four = sorted(xs[v] for xs in aligned)
        out.append((four[1] + four[2]) / 2)
    return out


def _type1_conflicts(layers: list[list[int]], lp: list[list[int]], order: list[int],
                     dummy: list[bool]) -> set[tuple[int, int]]:
    """Edges crossing an inner segment (dummy to dummy): those yield to long edges."""
    conflicts: set[tuple[int, int]] = set()
    for li in range(1, len(layers)):
        prev, lay = layers[li - 1], layers[li]
        k0, scan = 0, 0
        for i, v in enumerate(lay):
            w = next((u for u in lp[v] if dummy[u]), None) if dummy[v] else None
            k1 = order[w] if w is not None else len(prev)
            if w is not None or i == len(lay) - 1:
                for s_node in lay[scan:i + 1]:
                    for u in lp[s_node]:
                        if (order[u] < k0 or k1 < order[u]) and not (dummy[u] and dummy[s_node]):
                            conflicts.add((min(u, s_node), max(u, s_node)))
                scan, k0 = i + 1, k1
    return conflicts


def _vertical_alignment(layers: list[list[int]], conflicts: set[tuple[int, int]],
                        neighbours: list[list[int]], total: int) -> list[int]:
    root = list(range(total))
    align = list(range(total))
    pos = [0] * total
    for lay in layers:
        for i, v in enumerate(lay):
            pos[v] = i
    for lay in layers:
        prev = -1
        for v in lay:
            ws = neighbours[v]
            if not ws:
                continue
            ws = sorted(ws, key=pos.__getitem__)
            mid = (len(ws) - 1) / 2
            for i in range(int(mid), int(mid + 0.5) + 1):
                w = ws[i]
                if align[v] == v and prev < pos[w] and (min(v, w), max(v, w)) not in conflicts:
                    align[w] = v
                    root[v] = root[w]
                    align[v] = root[v]
                    prev = pos[w]
    return root


def _horizontal_compaction(layers: list[list[int]], root: list[int], lw: list[float],
                           dummy: list[bool], total: int) -> list[float]:
    succ: dict[int, dict[int, float]] = {}
    pred: dict[int, dict[int, float]] = {}
    for lay in layers:
        for u, v in zip(lay, lay[1:]):
            ru, rv = root[u], root[v]
            sep = _sep(u, v, lw, dummy)
            if succ.setdefault(ru, {}).get(rv, -1.0) < sep:
                succ[ru][rv] = sep
                pred.setdefault(rv, {})[ru] = sep
    roots = list(dict.fromkeys(root[v] for lay in layers for v in lay))
    indeg = {r: len(pred.get(r, ())) for r in roots}
    ready = [r for r in roots if indeg[r] == 0]
    topo = []
    while ready:
        r = ready.pop()
        topo.append(r)
        for s in succ.get(r, ()):
            indeg[s] -= 1
            if indeg[s] == 0:
                ready.append(s)
    if len(topo) < len(roots):  # cannot happen for a valid alignment; stay total anyway
        seen = set(topo)
        topo += [r for r in roots if r not in seen]
    xs: dict[int, float] = {}
    for r in topo:  # smallest coordinates
        xs[r] = max((xs.get(p, 0.0) + sep for p, sep in pred.get(r, {}).items()), default=0.0)
    for r in reversed(topo):  # then as far right as the right neighbours allow
        right = [xs[s] - sep for s, sep in succ.get(r, {}).items()]
        if right:
            xs[r] = max(xs[r], min(right))
    return [xs.get(root[v], 0.0) for v in range(total)]


def _sep(a: int, b: int, lw: list[float], dummy: list[bool]) -> float:
    gap = 8 if dummy[a] or dummy[b] else GAP
    return (lw[a] + lw[b]) / 2 + gap


def _path(pts: list[tuple[float, float]]) -> str:
    d = [f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"]
    for (ax, ay), (bx, by) in zip(pts, pts[1:]):
        if abs(ax - bx) < 0.5:
            d.append(f"L{bx:.1f},{by:.1f}")
        else:
            my = (ay + by) / 2
            d.append(f"C{ax:.1f},{my:.1f} {bx:.1f},{my:.1f} {bx:.1f},{by:.1f}")
    return "".join(d)


def _long_path(a: tuple[float, float], b: tuple[float, float]) -> str:
    bend = min(240.0, 30 + (b[1] - a[1]) * 0.08)
    return (f"M{a[0]:.1f},{a[1]:.1f}C{a[0] + bend:.1f},{a[1] + 60:.1f} "
            f"{b[0] + bend:.1f},{b[1] - 60:.1f} {b[0]:.1f},{b[1]:.1f}")


def group_key(module: str, depth: int) -> str:
    return ".".join(module.split(".")[:depth]) if module else ""


def _group_depth(modules: list[str]) -> int:
    """The deepest module depth whose groups still hold 4+ nodes on average (at most
    150 groups): blocks of a network rather than single layers."""
    modules = [m for m in modules if m]
    best = 1
    for depth in range(1, 6):
        count = len({group_key(m, depth) for m in modules})
        if count > 150 or not count:
            break
        if len(modules) / count >= 4:
            best = depth
    return best


def _groups(vis: list[dict], out: Layout) -> list[tuple[str, float, float, float, float]]:
    depth = _group_depth([n["module"] for n in vis])
    boxes: dict[str, list[float]] = {}
    for node in vis:
        g = group_key(node["module"], depth)
        if not g:
            continue
        (x, y), (w, h) = out.pos[node["id"]], out.size[node["id"]]
        box = boxes.setdefault(g, [x - w / 2, y - h / 2, x + w / 2, y + h / 2])
        box[0], box[1] = min(box[0], x - w / 2), min(box[1], y - h / 2)
        box[2], box[3] = max(box[2], x + w / 2), max(box[3], y + h / 2)
    sizes: dict[str, int] = {}
    for node in vis:
        g = group_key(node["module"], depth)
        sizes[g] = sizes.get(g, 0) + 1
    # A box around a single node says nothing its own module line does not.
    return [(g, b[0] - 10, b[1] - 17, b[2] + 10, b[3] + 6) for g, b in boxes.items()
            if sizes[g] > 1]


# ---------------------------------------------------------------- drawing
_TEXT_Y = {1: (4,), 2: (-4, 11), 3: (-7, 8, 20)}  # baselines by number of text lines


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def render_svg_view(desc: dict, view: str, status: dict[str, str] | None = None,
                    layout: Layout | None = None) -> str:
    """The inline ``<svg>`` of one graph; ``view`` names it (``after``/``before``)."""
    layout = layout or compute_layout(desc)
    nodes = {n["id"]: n for n in desc["nodes"]}
    status = status or {}
    parts = [f'<svg class="canvas" data-view="{_e(view)}" data-width="{layout.width}" '
             f'data-height="{layout.height}" role="img" aria-label="{_e(view)} graph">',
             '<defs>'
             f'<marker id="arrow-{_e(view)}" viewBox="0 0 10 10" refX="9" refY="5" '
             'markerUnits="userSpaceOnUse" markerWidth="8" markerHeight="8" orient="auto-start-reverse">'
             '<path d="M0,1L10,5L0,9z" class="arrowhead"/></marker></defs>',
             '<g class="viewport">']
    for i, (name, x0, y0, x1, y1) in enumerate(layout.groups):
        parts.append(f'<g class="group g{i % 2}" data-module="{_e(name)}">'
                     f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" '
                     f'height="{y1 - y0:.1f}" rx="8"/></g>')
    parts.append('<g class="edges">')
    for d, src, dst, cls in layout.edges:
        marker = f' marker-end="url(#arrow-{_e(view)})"' if dst else ""
        parts.append(f'<path class="{cls}" d="{d}" data-src="{_e(src)}" '
                     f'data-dst="{_e(dst)}"{marker}/>')
    parts.append('</g><g class="group-labels">')  # above the edges, below the nodes
    parts.extend(f'<text x="{x0 + 8:.1f}" y="{y0 + 12:.1f}">{_e(name)}</text>'
                 for name, x0, y0, _, _ in layout.groups)
    parts.append('</g><g class="nodes">')
    lines = layout.lines
    for nid, (x, y) in layout.pos.items():
        node = nodes[nid]
        w, h = layout.size[nid]
        st = status.get(nid, "kept")
        texts = [(c, t) for c, t in zip(("l1", "l2", "l3"), lines[nid]) if t]
        tip = "\n".join(t for t in (node["target"], node["module"],
                                    short_dims(node["shape"])) if t)
        parts.append(
            f'<g class="node st-{st} op-{_e(node["op"])}" data-id="{_e(nid)}" '
            f'transform="translate({x},{y})"><title>{_e(tip)}</title>'
            f'<rect x="{-w / 2:.1f}" y="{-h / 2:.1f}" width="{w}" height="{h}" rx="7" '
            f'fill="{kind_color(node)}"/>'
            + "".join(f'<text class="{cls}" y="{ty}">{_e(text)}</text>' for (cls, text), ty in
                      zip(texts, _TEXT_Y[len(texts)])))
        if st != "kept":
            mark = {"added": "+", "removed": "−", "changed": "~"}[st]
            parts.append(f'<g class="badge" transform="translate({-w / 2:.1f},0)">'
                         f'<circle r="8"/><text y="4">{mark}</text></g>')
        if node.get("annotations"):
            note = " ".join(f"{k}={v}" for k, v in node["annotations"].items())
            note = note if len(note) <= 28 else note[:27] + "…"
            nw = len(note) * 5.6 + 10
            parts.append(f'<g class="note" transform="translate({w / 2 - nw:.1f},{-h / 2 - 7:.1f})">'
                         f'<rect width="{nw:.1f}" height="13" rx="6"/>'
                         f'<text x="{nw / 2:.1f}" y="10">{_e(note)}</text></g>')
        parts.append('</g>')
    parts.append('</g></g></svg>')
    return "".join(parts)


def _view_data(desc: dict, status: dict[str, str]) -> dict:
    nodes = {}
    weights = {}
    for n in desc["nodes"]:
        if n["op"] == "get_attr":
            weights[n["id"]] = {k: n.get(k) for k in ("attr_path", "shape", "dtype", "params",
                                                      "module", "annotations")}
        elif n["op"] in DRAWN_OPS:
            nodes[n["id"]] = dict(n, status=status.get(n["id"], "kept"))
    return {"title": desc.get("title", ""), "source": desc.get("source", ""),
            "stats": desc["stats"], "nodes": nodes, "weights": weights}


def _json_script(data: object) -> str:
    text = json.dumps(data, separators=(",", ":"), default=str)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


ERROR_HOOK = """(function(){var pending=[];function report(m){var el=document.getElementById('js-errors');
if(el){el.textContent+=m+"\\n";}else{pending.push(m);}}window.__reportError=report;
window.__flushErrors=function(){var el=document.getElementById('js-errors');if(el&&pending.length){
el.textContent+=pending.join("\\n")+"\\n";pending=[];}};
window.addEventListener('error',function(ev){report('error: '+ev.message+' ('+(ev.filename||'inline')+':'+ev.lineno+')');});
window.addEventListener('unhandledrejection',function(ev){report('unhandled rejection: '+ev.reason);});
var ce=console.error;console.error=function(){report('console.error: '+Array.prototype.join.call(arguments,' '));
return ce.apply(console,arguments);};})();"""


def render_html(desc: dict, diff: dict | None = None, *, title: str = "") -> str:
    """One self-contained HTML page (no network access needed) for ``desc``.

    With ``diff`` (from ``diff(before, after)`` where ``desc`` is ``after``), the page
    shows both graphs side by side or one at a time, added/removed/changed nodes
    highlighted, and the diff summary.
    """
    title = title or desc.get("title") or desc.get("source") or "graph"
    stats = desc["stats"]
    views = []
    data: dict = {"views": {}, "diff": None}
    if diff is not None:
        before = diff["before_graph"]
        views.append(("before", before, diff["status"]["before"]))
        views.append(("after", desc, diff["status"]["after"]))
        data["diff"] = {k: diff[k] for k in ("summary", "weights", "by_op", "changes",
                                             "node_count", "params")}
        data["diff"]["partner"] = {"before": {b: a for b, a in diff["pairs"]},
                                   "after": {a: b for b, a in diff["pairs"]}}
    else:
        views.append(("after", desc, {}))

    panes = []
    for name, d, status in views:
        data["views"][name] = _view_data(d, status)
        label = {"before": "Before", "after": "After" if diff is not None else "Graph"}[name]
        panes.append(
            f'<section class="pane" data-view="{name}"><div class="pane-head">'
            f'<b>{label}</b> <span class="muted">{d["stats"]["nodes"]} compute nodes · '
            f'{d["stats"]["params"]:,} params</span></div>'
            f'<div class="canvas-wrap">{render_svg_view(d, name, status)}'
            f'<div class="rail" title="overview: click to jump"><div class="thumb"></div></div>'
            f'</div></section>')

    head = [f'<h1>{_e(title)}</h1>',
            f'<div class="meta"><span class="muted">source</span> <code>{_e(desc.get("source", ""))}</code>']
    if desc.get("inputs"):
        ins = ", ".join(f'{i["name"]}: {short_dims(i["shape"])} {i["dtype"]}' for i in desc["inputs"])
        head.append(f' <span class="muted">inputs</span> <code>{_e(ins)}</code>')
    head.append('</div><div class="stats">')
    if diff is not None:
        head.append(f'<span class="chip"><span id="node-count-before">{diff["node_count"]["before"]}</span>'
                    f' → <span id="node-count">{stats["nodes"]}</span> compute nodes</span>'
                    f'<span class="chip">{diff["params"]["before"]:,} → {stats["params"]:,} params</span>')
        s = diff["summary"]
        for st in STATUSES:
            head.append(f'<span class="chip st-{st}" title="compute nodes {st}">'
                        f'<span class="dot"></span>{s[st]} {st}</span>')
    else:
        head.append(f'<span class="chip"><span id="node-count">{stats["nodes"]}</span> compute nodes</span>'
                    f'<span class="chip">{stats["params"]:,} params</span>'
                    f'<span class="chip">{len(stats["ops"])} distinct ops</span>')
    head.append('</div>')

    side = ['<div id="details"><div class="hint">Click a node to see its details.</div></div>']
    if diff is not None:
        side.append(f'<h3>Diff</h3><p class="summary">'
                    f'{_e(summary_line(diff).replace("->", "→"))}</p>')
        w = diff["weights"]
        if any(w[k] for k in ("added", "removed", "changed")):
            side.append(f'<p class="summary">weights: {w["added"]} added, {w["removed"]} removed, '
                        f'{w["changed"]} changed</p>')
        rows = op_changes(diff)
        side.append('<table class="ops"><tbody>' + "".join(
            f'<tr><td><a href="#" class="op-link" data-q="{_e(op)}">{_e(op)}</a></td>'
            f'<td>{_e(text)}</td></tr>' for op, text in rows) + '</tbody></table>'
            if rows else '<p class="muted">No compute node changed.</p>')
    else:
        side.append('<h3>Ops</h3><table class="ops"><tbody>' + "".join(
            f'<tr><td><a href="#" class="op-link" data-q="{_e(op)}">{_e(op)}</a></td>'
            f'<td>{count}</td></tr>'
            for op, count in sorted(stats["ops"].items(), key=lambda kv: (-kv[1], kv[0])))
            + '</tbody></table>')

    toggles = ""
    if diff is not None:
        toggles = ('<div class="seg" id="mode"><button data-mode="side" class="on">Side by side</button>'
                   '<button data-mode="before">Before</button><button data-mode="after">After</button></div>'
                   '<div class="seg"><button id="prev-change" title="Previous change (Shift+N)">‹</button>'
                   '<button id="next-change" title="Next change (N)">Next change ›</button></div>')
    legend = ('<span class="legend"><i class="sw added"></i>added <i class="sw removed"></i>removed '
              '<i class="sw changed"></i>changed</span>' if diff is not None else "")
    mode = "side" if diff is not None else "single"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} · gradrewrite inspect</title>
<script>{ERROR_HOOK}</script>
<style>{_asset("inspect.css")}</style>
</head><body class="mode-{mode}">
<header>{''.join(head)}</header>
<div id="toolbar"><input id="search" type="search" placeholder="Search op, module or name…" autocomplete="off">
<span id="matches" class="muted"></span>{toggles}
<div class="seg"><button id="zoom-out" title="Zoom out">−</button><button id="zoom-in" title="Zoom in">+</button>
<button id="zoom-fit" title="Fit to view">Fit</button><button id="zoom-1" title="Actual size">1:1</button></div>
{legend}<span class="muted hint">drag to pan · wheel to scroll · Ctrl+wheel to zoom</span></div>
<main><div id="views">{''.join(panes)}</div>
<aside id="side">{''.join(side)}</aside></main>
<pre id="js-errors"></pre>
<script type="application/json" id="graph-data">{_json_script(data)}</script>
<script>window.__flushErrors();{_asset("inspect.js")}</script>
</body></html>
"""
