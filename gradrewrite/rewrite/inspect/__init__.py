"""The graph inspector: describe a ``Graph``, compare two, render them.

``describe`` turns a graph into plain JSON-able data; ``diff`` matches two
descriptions; the renderers turn a description (plus an optional diff) into a text
table, graphviz DOT, JSON or a self-contained HTML page. ``render`` is what
``gradrewrite inspect`` calls.
"""
from __future__ import annotations

import json

from ...errors import ConfigError
from ..graph import Graph
from .describe import describe
from .diff import diff
from .dot import render_dot, render_svg
from .html import render_html
from .table import print_table, render_table

FORMATS = ("table", "dot", "json", "html")


def render_json(desc: dict, diff: dict | None = None) -> str:  # noqa: F811 - shadows diff()
    """The description as JSON; with a diff, ``{"graph": desc, "diff": diff}``."""
    data = desc if diff is None else {"graph": desc, "diff": diff}
    return json.dumps(data, indent=1, default=str) + "\n"


def render(fmt: str, before_graph: Graph, after_graph: Graph | None = None, *,
           show_diff: bool = False, title: str = "", weights: bool = False) -> str:
    """Render ``after_graph`` (or ``before_graph`` when there is no after) as ``fmt``.

    With ``show_diff``, the output also shows how ``after_graph`` differs from
    ``before_graph`` (without an ``after_graph`` the graph is compared with itself,
    so everything shows as kept). ``weights`` lists weight nodes as rows of their own
    in the table and as nodes of their own in dot (by default they are folded into the
    layers that read them).
    """
    renderers = {"table": render_table, "dot": render_dot, "json": render_json,
                 "html": render_html}
    if fmt not in renderers:
        raise ConfigError(f"unknown inspect format {fmt!r}",
                          f"use one of: {', '.join(FORMATS)}")
    before = describe(before_graph, title=title)
    after = describe(after_graph, title=title) if after_graph is not None else before
    changes = diff(before, after) if show_diff else None
    if fmt == "table":
        return render_table(after, changes, weights=weights)
    if fmt == "dot":
        return render_dot(after, changes, weights="show" if weights else "fold")
    return renderers[fmt](after, changes)


__all__ = ["describe", "diff", "render", "render_table", "print_table", "render_dot",
           "render_svg", "render_html", "render_json", "FORMATS"]
