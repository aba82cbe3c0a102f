"""The graph as graphviz DOT text, and DOT -> SVG through the ``dot`` program."""
from __future__ import annotations

import shutil
import subprocess

from .diff import op_changes, summary_line
from .describe import kind_color, short_dims, short_op, weight_summary

LARGE = 200  # drawn nodes past which dot is told to trade layout quality for time
DIFF_STYLE = {  # fill, border, extra style
    "added": ("#bbf7d0", "#16a34a", ""),
    "removed": ("#fecaca", "#dc2626", ",dashed"),
    "changed": ("#fed7aa", "#ea580c", ""),
}


def render_dot(desc: dict, diff: dict | None = None, *, weights: str = "fold",
               cluster_depth: int = 1) -> str:
    """DOT text: one box per placeholder/compute/output node, labelled op + shape.

    Nodes are grouped into one ``subgraph cluster`` per module path prefix
    (``cluster_depth`` dotted parts, 1 = top-level modules). ``weights="fold"`` shows
    a node's weights as a small line in its label; ``"show"`` draws each weight as a
    small node of its own. With ``diff``, added nodes are green, changed orange, and
    removed ones (taken from the diff's ``before`` graph) red and dashed.
    """
    if weights not in ("fold", "show"):
        raise ValueError(f"weights must be 'fold' or 'show', not {weights!r}")
    nodes = {n["id"]: n for n in desc["nodes"]}
    status_a = diff["status"]["after"] if diff else {}
    shown = lambda n: n["op"] != "get_attr" or weights == "show"  # noqa: E731

    # (dot id, node, status) for everything drawn, in graph order.
    items = [(_qid("n", n["id"]), n, status_a.get(n["id"], "kept"))
             for n in desc["nodes"] if shown(n)]
    extra_edges: list[tuple[str, str]] = []
    if diff:
        before = {n["id"]: n for n in diff["before_graph"]["nodes"]}
        partner = {b: a for b, a in diff["pairs"]}
        status_b = diff["status"]["before"]

        def before_id(bid: str) -> str | None:
            if not shown(before[bid]):
                return None
            if bid in partner:
                return _qid("n", partner[bid])
            return _qid("r", bid) if status_b.get(bid) == "removed" else None

        for b in diff["before_graph"]["nodes"]:
            if status_b.get(b["id"]) != "removed" or not shown(b):
                continue
            items.append((_qid("r", b["id"]), b, "removed"))
            for src in b["args"]:
                if before_id(src):
                    extra_edges.append((before_id(src), _qid("r", b["id"])))
            for dst in b["users"]:
                if before_id(dst) and status_b.get(dst) != "removed":
                    extra_edges.append((_qid("r", b["id"]), before_id(dst)))

    out = ["digraph G {",
           '  graph [rankdir=TB, fontname="Helvetica", fontsize=11, labelloc="t", '
           'labeljust="l", nodesep=0.25, ranksep=0.35, newrank=true];',
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", '
           'fontsize=10, margin="0.12,0.04", height=0.3, color="#64748b", penwidth=1];',
           '  edge [color="#94a3b8", arrowsize=0.6];',
           f"  label={_graph_label(desc, diff)};"]
    if len(items) > LARGE:
        # dot's network-simplex ranking/placement is superlinear and, unbounded, takes
        # minutes past a few hundred nodes; capped it draws 1000 nodes in seconds.
        out.append("  graph [nslimit=2, nslimit1=2, mclimit=0.3];")

    # Cluster tree: prefix tuple -> node lines, emitted depth first.
    tree: dict[tuple[str, ...], list[str]] = {}
    for qid, node, status in items:
        parts = tuple(node["module"].split(".")[:cluster_depth]) if node["module"] else ()
        tree.setdefault(parts, []).append(_node_line(qid, node, status, nodes, diff is not None))
        for i in range(len(parts)):
            tree.setdefault(parts[:i], [])
    out.extend(_emit_clusters((), tree, "  "))

    for qid, node, _ in items:
        if qid.startswith('"r:'):
            continue
        for src in node["args"]:
            if src in nodes and shown(nodes[src]):
                style = ' [style=dashed, arrowhead=none]' if nodes[src]["op"] == "get_attr" else ""
                out.append(f"  {_qid('n', src)} -> {qid}{style};")
    for src, dst in extra_edges:
        out.append(f'  {src} -> {dst} [color="#dc2626", style=dashed];')
    out.append("}")
    return "\n".join(out) + "\n"


def render_svg(dot_text: str, *, timeout: float = 120) -> str | None:
    """Run ``dot -Tsvg``; None when graphviz is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    proc = subprocess.run([exe, "-Tsvg"], input=dot_text.encode(), capture_output=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"dot -Tsvg failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode()


def _emit_clusters(prefix: tuple[str, ...], tree: dict[tuple[str, ...], list[str]],
                   indent: str) -> list[str]:
    lines = [indent + line for line in tree.get(prefix, [])]
    children = [p for p in tree if len(p) == len(prefix) + 1 and p[:len(prefix)] == prefix]
    for child in children:
        name = ".".join(child)
        lines.append(f"{indent}subgraph {_quote('cluster_' + name)} {{")
        lines.append(f'{indent}  label={_quote(name)}; style="rounded,filled"; '
                     f'color="#cbd5e1"; fillcolor="#f8fafc"; fontcolor="#334155";')
        lines.extend(_emit_clusters(child, tree, indent + "  "))
        lines.append(f"{indent}}}")
    return lines


def _node_line(qid: str, node: dict, status: str, nodes: dict[str, dict], has_diff: bool) -> str:
    op = node["op"]
    if op == "get_attr":
        leaf = node.get("attr_path", node["id"]).rpartition(".")[2]
        label = (f'<<FONT POINT-SIZE="8">{_h(leaf)} {_h(short_dims(node["shape"]))}'
                 f'</FONT>>')
        return (f'{qid} [label={label}, shape=plaintext, style="", height=0.15, '
                f'fontcolor="#64748b"];')
    title = {"placeholder": f"input {node['id']}", "output": "output"}.get(op, short_op(node))
    rows = [f"<B>{_h(title)}</B>"]
    dims = short_dims(node["shape"])
    if dims:
        dtype = f" {node['dtype']}" if node.get("dtype") and node["dtype"] != "float32" else ""
        rows.append(f'<FONT POINT-SIZE="9">{_h(dims + dtype)}</FONT>')
    if op == "call_function":
        folded = weight_summary(node, nodes)
        if folded:
            rows.append(f'<FONT POINT-SIZE="8" COLOR="#475569">{_h(folded)}</FONT>')
        if node.get("annotations"):
            note = ", ".join(f"{k}={v}" for k, v in node["annotations"].items())
            rows.append(f'<FONT POINT-SIZE="8" COLOR="#7c3aed">{_h(note)}</FONT>')
    label = "<" + "<BR/>".join(rows) + ">"
    if has_diff and status in DIFF_STYLE:
        fill, border, extra = DIFF_STYLE[status]
        attrs = f'fillcolor="{fill}", color="{border}", penwidth=2, style="rounded,filled{extra}"'
    elif has_diff:
        attrs = 'fillcolor="#ffffff"'
    else:
        attrs = f'fillcolor="{kind_color(node)}"'
    tooltip = _quote(f"{node['target']} {node['module']}".strip())
    return f"{qid} [label={label}, {attrs}, tooltip={tooltip}];"


def _graph_label(desc: dict, diff: dict | None) -> str:
    stats = desc["stats"]
    rows = [f"<B>{_h(desc.get('title') or desc.get('source', ''))}</B>",
            _h(f"{stats['nodes']} compute nodes, {stats['params']:,} params")]
    if diff:
        rows.append(_h(summary_line(diff)))
        changed = op_changes(diff)[:8]
        if changed:
            rows.append(_h("; ".join(f"{op} {text}" for op, text in changed)))
    return "<" + "<BR ALIGN=\"LEFT\"/>".join(rows) + "<BR ALIGN=\"LEFT\"/>>"


def _h(text: str) -> str:
    """Escape for a graphviz HTML-like label."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _qid(prefix: str, node_id: str) -> str:
    return _quote(f"{prefix}:{node_id}")
