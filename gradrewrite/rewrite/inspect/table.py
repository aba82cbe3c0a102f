"""The graph as an aligned text table (like ``torch.fx``'s ``print_tabular``)."""
from __future__ import annotations

from typing import Any

from .diff import STATUSES, op_changes, summary_line

COLUMNS = ("name", "op/target", "module", "shape", "dtype", "args")
ANNOTATIONS = "annotations"   # extra column, shown when any row carries pass annotations
MARKS = {"kept": " ", "added": "+", "removed": "-", "changed": "~"}
STYLES = {"kept": "", "added": "green", "removed": "red", "changed": "yellow"}


def render_table(desc: dict, diff: dict | None = None, *, weights: bool = True) -> str:
    """Plain text (no markup), one node a row; with ``diff``, rows are marked
    ``+``/``-``/``~`` and a summary follows. ``weights=False`` leaves out weight rows."""
    header, rows, footer = _content(desc, diff, weights)
    columns = _columns(rows)
    cells = [list(columns)] + [r[1] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    mark = (lambda m: f"{m} ") if diff is not None else (lambda m: "")

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()

    out = list(header)
    out.append(mark(" ") + line(list(columns)))
    out.append(mark(" ") + line(["-" * w for w in widths]))
    out.extend(mark(MARKS[status]) + line(values) for status, values in rows)
    out.extend(footer)
    return "\n".join(out) + "\n"


def print_table(desc: dict, console: Any = None, diff: dict | None = None, *,
                weights: bool = True) -> None:
    """The same table on a rich console, with added/removed/changed rows colored."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    header, rows, footer = _content(desc, diff, weights)
    columns = _columns(rows)
    for line in header:
        console.print(Text(line, style="bold"))
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    if diff is not None:
        table.add_column("")
    for col in columns:
        table.add_column(col, overflow="fold")
    for status, values in rows:
        cells = [Text(v) for v in values]
        if diff is not None:
            cells.insert(0, Text(MARKS[status]))
        table.add_row(*cells, style=STYLES[status] or None)
    console.print(table)
    for line in footer:
        console.print(Text(line, style="bold"))


def _columns(rows: list[tuple[str, list[str]]]) -> tuple[str, ...]:
    """The fixed columns, plus ``annotations`` when some row has any."""
    return COLUMNS + (ANNOTATIONS,) if any(len(v) > len(COLUMNS) for _, v in rows) else COLUMNS


def fmt_annotations(annotations: dict | None) -> str:
    """Compact ``key=value`` text of a node's pass annotations (``sparsity=2:4 density=0.5``)."""
    parts = []
    for key, value in (annotations or {}).items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (dict, list)):
            value = _clip(str(value), 24)
        parts.append(f"{key}={value}")
    return " ".join(parts)


def fmt_shape(shape: list | None) -> str:
    return "" if shape is None else "[" + ", ".join(str(s) for s in shape) + "]"


def _content(desc: dict, diff: dict | None, weights: bool
             ) -> tuple[list[str], list[tuple[str, list[str]]], list[str]]:
    stats = desc["stats"]
    header = [f"# {desc['title']}"] if desc.get("title") else []
    header.append(f"# source: {desc.get('source', '')}")
    header.append(f"# {stats['nodes']} compute nodes, {stats['params']:,} params")
    after = {n["id"]: n for n in desc["nodes"]}
    if diff is None:
        entries = [("kept", n) for n in desc["nodes"]]
    else:
        before = {n["id"]: n for n in diff["before_graph"]["nodes"]}
        entries = [(r["status"], after[r["after"]] if r["after"] else before[r["before"]])
                   for r in diff["rows"]]
    rows = [(status, _cells(node)) for status, node in entries
            if weights or node["op"] != "get_attr"]
    if any(len(values) > len(COLUMNS) for _, values in rows):   # pad rows without notes
        rows = [(status, values + [""] * (len(COLUMNS) + 1 - len(values)))
                for status, values in rows]
    footer: list[str] = []
    if diff is not None:
        footer.append(f"# diff: {summary_line(diff)}")
        w = diff["weights"]
        if any(w[k] for k in STATUSES if k != "kept"):
            footer.append("#   weights: " + ", ".join(f"{w[k]} {k}" for k in STATUSES))
        for op, text in op_changes(diff):
            footer.append(f"#   {op}: {text}")
        for nid, fields in diff["changes"].items():
            for field, (old, new) in fields.items():
                if isinstance(old, dict) and isinstance(new, dict):  # only the keys that differ
                    for key in dict.fromkeys([*old, *new]):
                        if old.get(key) != new.get(key):
                            footer.append(f"#   ~ {nid}.{field}.{key}: {old.get(key, '-')} -> "
                                          f"{new.get(key, '-')}")
                else:
                    footer.append(f"#   ~ {nid}.{field}: {_text(old)} -> {_text(new)}")
    return header, rows, footer


def _cells(node: dict) -> list[str]:
    if node["op"] == "call_function":
        target = node["target"]
    elif node["op"] == "get_attr":
        target = f"get_attr {node.get('attr_path', '')}"
    else:
        target = node["op"]
    args = [f"%{a}" for a in node["args"]]
    args += [f"{k}={v}" for k, v in node["attrs"].items()]
    cells = [node["id"], target, node["module"], fmt_shape(node["shape"]),
             node["dtype"] or "", _clip(", ".join(args), 72)]
    notes = fmt_annotations(node.get("annotations"))
    return cells + [_clip(notes, 60)] if notes else cells


def _clip(text: str, width: int) -> str:
    """Keep one row on one line; the full args are in the JSON and HTML views."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _text(value: Any) -> str:
    if isinstance(value, list):
        return fmt_shape(value)
    return str(value)
