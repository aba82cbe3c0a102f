"""The graph inspector: describe, diff, and the table / DOT / JSON / HTML renderers.

The HTML page is checked in a real headless Chromium: the live DOM after its scripts
ran must show the right node counts, carry no JS errors and load nothing remote.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from gradrewrite.errors import ConfigError
from gradrewrite.rewrite.graph import Graph, copy_meta
from gradrewrite.rewrite.inspect import (
    describe, diff, print_table, render, render_dot, render_html, render_json, render_svg,
    render_table,
)
from gradrewrite.rewrite.inspect.html import compute_layout

aten = torch.ops.aten
DRAWN = ("placeholder", "call_function", "output")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.features(x)
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(scope="module")
def graph() -> Graph:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    ep = torch.export.export(Small().eval(), (x,))
    return Graph.from_exported_program(ep, (x,), source="test")


def _node(g: Graph, name: str):
    return next(n for n in g.graph.nodes if n.name == name)


def without_relu(g: Graph) -> Graph:
    """What a pass dropping the ReLU leaves: its users read its input."""
    g = g.clone()
    relu = _node(g, "relu")
    relu.replace_all_uses_with(relu.args[0])
    g.gm.graph.erase_node(relu)
    g.gm.recompile()
    return g


def drawn(desc: dict) -> int:
    return sum(n["op"] in DRAWN for n in desc["nodes"])


# ------------------------------------------------------------------ describe
def test_describe_structure(graph):
    desc = describe(graph, title="small")
    json.dumps(desc)  # JSON-able as is
    assert desc["title"] == "small" and desc["source"] == "test"
    assert desc["inputs"] == [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}]
    nodes = {n["id"]: n for n in desc["nodes"]}

    conv = nodes["conv2d"]
    assert conv["op"] == "call_function" and conv["target"] == "aten.conv2d"
    assert conv["kind"] == "conv"
    assert conv["module"] == "features.0" and conv["module_type"] == "Conv2d"
    assert conv["shape"] == [1, 8, 8, 8] and conv["dtype"] == "float32"
    assert conv["args"] == ["x", "features_0_weight", "features_0_bias"]
    assert conv["users"] == ["batch_norm"]
    assert conv["attrs"] == {"stride": "[1, 1]", "padding": "[1, 1]"}
    assert conv["weight_params"] == 8 * 3 * 3 * 3 + 8
    assert "test_inspect.py" in conv["stack_trace"] and "self.features(x)" in conv["stack_trace"]
    assert conv["annotations"] == {}

    assert nodes["batch_norm"]["module"] == "features.1"
    assert nodes["relu"]["module"] == "features.2" and nodes["relu"]["kind"] == "relu"
    assert nodes["linear"]["module"] == "fc" and nodes["linear"]["shape"] == [1, 4]
    weight = nodes["features_0_weight"]
    assert weight["op"] == "get_attr" and weight["params"] == 8 * 3 * 3 * 3
    assert weight["attr_path"] == "features.0.weight" and weight["module"] == "features.0"
    assert nodes["x"]["op"] == "placeholder" and nodes["output"]["args"] == ["linear"]

    assert ["conv2d", "batch_norm"] in desc["edges"]
    assert ["features_0_weight", "conv2d"] in desc["edges"]
    assert len(desc["edges"]) == sum(len(n["args"]) for n in desc["nodes"])
    stats = desc["stats"]
    assert stats["nodes"] == graph.node_count() == 6
    assert stats["params"] == graph.parameter_count()
    assert stats["params"] == sum(n["params"] for n in desc["nodes"])
    assert stats["ops"]["aten.conv2d"] == 1 and sum(stats["ops"].values()) == 6


def test_describe_annotations(graph):
    g = graph.clone()
    _node(g, "linear").meta["gradrewrite"] = {"sparsity": "2:4", "bits": 4,
                                              "scale": torch.tensor(0.5)}
    nodes = {n["id"]: n for n in describe(g)["nodes"]}
    assert nodes["linear"]["annotations"] == {"sparsity": "2:4", "bits": 4, "scale": 0.5}


# ------------------------------------------------------------------ diff
def test_diff_removed_node(graph):
    before, after = describe(graph), describe(without_relu(graph))
    d = diff(before, after)
    json.dumps(d)
    assert d["summary"] == {"kept": 5, "added": 0, "removed": 1, "changed": 0}
    assert d["by_op"]["aten.relu"] == {"kept": 0, "added": 0, "removed": 1, "changed": 0}
    assert d["by_op"]["aten.conv2d"]["kept"] == 1
    assert d["status"]["before"]["relu"] == "removed"
    assert "relu" not in d["status"]["after"]
    assert d["node_count"] == {"before": 6, "after": 5}
    assert d["weights"]["kept"] == 9
    rows = [(r["status"], r["before"], r["after"]) for r in d["rows"]]
    i = rows.index(("removed", "relu", None))
    assert rows[i - 1][2] == "batch_norm" and rows[i + 1][2] == "adaptive_avg_pool2d"


def test_diff_matches_renamed_added_and_changed_nodes(graph):
    g = graph.clone()
    # Replace the ReLU with a fresh node (new fx name, same module and op): kept.
    relu = _node(g, "relu")
    with g.graph.inserting_after(relu):
        fresh = g.graph.call_function(aten.relu.default, (relu.args[0],))
    copy_meta(relu, fresh, keep_val=True)
    relu.replace_all_uses_with(fresh)
    g.graph.erase_node(relu)
    # Add a clamp after it: added. Annotate the linear: changed.
    with g.graph.inserting_after(fresh):
        clamp = g.graph.call_function(aten.clamp.default, (fresh, None, 6.0))
    copy_meta(fresh, clamp, keep_val=True)
    fresh.replace_all_uses_with(clamp)
    clamp.args = (fresh, None, 6.0)
    _node(g, "linear").meta["gradrewrite"] = {"bits": 4}
    g.commit()
    assert fresh.name != "relu"

    d = diff(describe(graph), describe(g))
    assert d["summary"] == {"kept": 5, "added": 1, "removed": 0, "changed": 1}
    assert d["status"]["after"][fresh.name] == "kept"
    assert [fresh.name, "relu"][::-1] in d["pairs"]
    assert d["status"]["after"][clamp.name] == "added"
    assert d["by_op"]["aten.clamp"]["added"] == 1
    assert d["changes"]["linear"] == {"annotations": [{}, {"bits": 4}]}


# ------------------------------------------------------------------ table / json / dot
def test_table(graph):
    desc = describe(graph, title="small")
    text = render_table(desc)
    assert "\x1b" not in text and "[bold" not in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("name"))
    for col in ("op/target", "module", "shape", "dtype", "args"):
        assert col in header
    conv = next(line for line in lines if line.startswith("conv2d "))
    assert conv.index("aten.conv2d") == header.index("op/target")
    assert conv.index("features.0") == header.index("module")
    assert conv.index("[1, 8, 8, 8]") == header.index("shape")
    assert "%x, %features_0_weight" in conv and "stride=[1, 1]" in conv
    assert "# 6 compute nodes" in text
    no_weights = render_table(desc, weights=False).splitlines()
    assert not any(line.startswith("features_0_weight") for line in no_weights)
    assert any(line.startswith("conv2d ") for line in no_weights)

    d = diff(describe(graph), describe(without_relu(graph)))
    text = render_table(describe(without_relu(graph)), d)
    assert re.search(r"^- relu\s+aten\.relu\s+features\.2", text, re.M)
    assert re.search(r"^  conv2d\s+aten\.conv2d", text, re.M)
    assert "1 removed" in text and "aten.relu: -1" in text


def test_print_table_rich(graph):
    from rich.console import Console

    console = Console(record=True, width=220, color_system=None)
    print_table(describe(graph), console)
    out = console.export_text()
    assert "conv2d" in out and "features.0" in out and "aten.linear" in out


def test_json(graph):
    desc = describe(graph)
    assert json.loads(render_json(desc)) == json.loads(json.dumps(desc))
    d = diff(desc, describe(without_relu(graph)))
    data = json.loads(render_json(describe(without_relu(graph)), d))
    assert data["diff"]["summary"]["removed"] == 1
    assert {n["id"] for n in data["graph"]["nodes"]} >= {"conv2d", "linear"}


def _has_dot() -> bool:
    return shutil.which("dot") is not None or Path("/usr/bin/dot").exists()


def test_dot_renders_with_graphviz(graph):
    desc = describe(graph, title="small & <odd>")
    text = render_dot(desc)
    assert text.startswith("digraph")
    assert '"n:conv2d"' in text and "1×8×8×8" in text
    assert 'subgraph "cluster_features"' in text and 'subgraph "cluster_fc"' in text
    assert '"n:features_0_weight"' not in text  # weights folded into their users
    assert "weight 8×3×3×3" in text
    assert '"n:features_0_weight"' in render_dot(desc, weights="show")

    d = diff(describe(graph), describe(without_relu(graph)))
    text_diff = render_dot(describe(without_relu(graph)), d)
    assert '"r:relu"' in text_diff and "#dc2626" in text_diff
    if not _has_dot():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "graphviz not installed (apt-get install graphviz)")
    for t in (text, text_diff, render_dot(desc, weights="show", cluster_depth=2)):
        svg = render_svg(t)
        assert svg is not None and "<svg" in svg and "conv2d" in svg


def evil(desc: dict) -> dict:
    """A description whose module path and title need escaping everywhere."""
    desc = copy.deepcopy(desc)
    for n in desc["nodes"]:
        if n["module"] == "features.0":
            n["module"] = 'features.0</script><b x="1">&amp;'
    desc["title"] = "<script>alert(1)</script> & co"
    return desc


def test_escaping_in_dot_and_html(graph):
    desc = evil(describe(graph))
    text = render_dot(desc)
    if _has_dot():
        assert "<svg" in render_svg(text)
    page = render_html(desc)
    assert "</script><b" not in page and "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page


# ------------------------------------------------------------------ render()
def test_render_dispatch(graph):
    after = without_relu(graph)
    assert "aten.conv2d" in render("table", graph)
    assert json.loads(render("json", graph, after, show_diff=True))["diff"]["summary"]["removed"] == 1
    assert "- relu" in render("table", graph, after, show_diff=True)
    assert "relu" not in render("table", graph, after).replace("features.2", "")
    assert render("dot", graph, title="t").startswith("digraph")
    assert 'id="node-count-before"' in render("html", graph, after, show_diff=True)
    same = json.loads(render("json", graph, show_diff=True))
    assert same["diff"]["summary"]["kept"] == 6
    with pytest.raises(ConfigError) as err:
        render("svg", graph)
    assert all(f in err.value.one_line() for f in ("table", "dot", "json", "html"))


# ------------------------------------------------------------------ layout at scale
def test_layout_scales_and_does_not_overlap():
    """~2000 nodes: a chain of residual blocks plus an input read by every block."""
    nodes = [{"id": "x", "op": "placeholder", "args": []},
             {"id": "mask", "op": "placeholder", "args": []}]
    prev = "x"
    for b in range(250):
        names = [f"b{b}_{i}" for i in range(8)]
        args = [[prev], [names[0]], [names[1]], [names[0]], [names[3], "mask"], [names[4]],
                [names[2], names[5]], [names[6], prev]]
        nodes += [{"id": nm, "op": "call_function", "args": a} for nm, a in zip(names, args)]
        prev = names[-1]
    nodes.append({"id": "output", "op": "output", "args": [prev]})
    for n in nodes:
        n.update(target=f"aten.op{len(n['args'])}", kind="op", module=n["id"].split("_")[0],
                 shape=[1, 64], dtype="float32", attrs={}, annotations={}, users=[])
    start = time.perf_counter()
    layout = compute_layout({"nodes": nodes})
    assert time.perf_counter() - start < 10
    assert len(layout.pos) == len(nodes) == 2003
    rows: dict[float, list[tuple[float, float]]] = {}
    for nid, (x, y) in layout.pos.items():
        w = layout.size[nid][0]
        rows.setdefault(y, []).append((x - w / 2, x + w / 2))
    for spans in rows.values():
        spans.sort()
        assert all(a[1] <= b[0] + 0.5 for a, b in zip(spans, spans[1:]))
    assert layout.width < 2000  # repeated blocks stack up instead of drifting sideways


# ------------------------------------------------------------------ HTML in a browser
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    # CI installs chromium (.ci/run): there a missing browser is a failure, not a skip.
    (pytest.fail if os.environ.get("CI") else pytest.skip)(
        "chromium not installed (apt-get install chromium)")


def _browser(tmp_path: Path, page: Path, *extra: str) -> str:
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'chrome-profile'}",
            "--virtual-time-budget=5000", *extra, page.resolve().as_uri()]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _dump_dom(tmp_path: Path, html_text: str, name: str = "page.html") -> str:
    page = tmp_path / name
    page.write_text(html_text, encoding="utf-8")
    dom = _browser(tmp_path, page, "--window-size=1400,900", "--dump-dom")
    assert 'data-ready="1"' in dom, "the page script did not run to its end"
    return dom


def _text_of(dom: str, element_id: str) -> str:
    m = re.search(rf'<(\w+)[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', dom, re.S)
    assert m, f"no #{element_id} in the page"
    return m.group(2)


def _no_remote(page: str) -> None:
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page, re.I)
    assert "@import" not in page


NODE_RE = re.compile(r'<g class="node[\s"]')


def test_html_in_browser(graph, tmp_path):
    desc = evil(describe(graph, title="small"))
    page = render_html(desc)
    _no_remote(page)
    dom = _dump_dom(tmp_path, page)
    assert _text_of(dom, "js-errors") == ""
    assert _text_of(dom, "node-count") == "6"
    assert len(NODE_RE.findall(dom)) == drawn(desc) == 8  # input, 6 ops, output
    assert len(re.findall(r'data-id="', dom)) >= drawn(desc)
    assert 'id="node-count-before"' not in dom
    _no_remote(dom)


def test_html_diff_in_browser_with_screenshot(graph, tmp_path):
    before, after = describe(graph), describe(without_relu(graph))
    d = diff(before, after)
    page = render_html(after, d, title="drop relu")
    _no_remote(page)
    dom = _dump_dom(tmp_path, page)
    assert _text_of(dom, "js-errors") == ""
    assert _text_of(dom, "node-count") == "5"
    assert _text_of(dom, "node-count-before") == "6"
    assert len(NODE_RE.findall(dom)) == drawn(before) + drawn(after) == 8 + 7
    assert re.search(r'<g class="node st-removed[^"]*" data-id="relu"', dom)
    assert "1 removed" in dom

    shot = tmp_path / "page.png"
    _browser(tmp_path, tmp_path / "page.html", "--window-size=1400,900", f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_html_click_and_search_in_browser(graph, tmp_path):
    """Clicking a node fills the side panel; the search box dims what does not match."""
    before, after = describe(graph), describe(without_relu(graph))
    page = render_html(after, diff(before, after))
    probe = """<script>setTimeout(function () {
      var g = document.querySelector('svg[data-view="after"] g.node[data-id="conv2d"]');
      g.dispatchEvent(new PointerEvent('pointerdown', {bubbles: true, button: 0, clientX: 5, clientY: 5}));
      g.dispatchEvent(new PointerEvent('pointerup', {bubbles: true, button: 0, clientX: 5, clientY: 5}));
      var s = document.getElementById('search');
      s.value = 'features.1';
      s.dispatchEvent(new Event('input'));
      var out = document.createElement('pre');
      out.id = 'probe';
      out.textContent = JSON.stringify({
        details: document.getElementById('details').textContent,
        selected: document.querySelectorAll('g.node.sel').length,
        hits: document.querySelectorAll('g.node.hit').length,
        dim: document.querySelectorAll('g.node.dim').length});
      document.body.appendChild(out);
    }, 100);</script></body>"""
    dom = _dump_dom(tmp_path, page.replace("</body>", probe))
    assert _text_of(dom, "js-errors") == ""
    probe_out = json.loads(_text_of(dom, "probe").replace("&quot;", '"').replace("&amp;", "&")
                           .replace("&lt;", "<").replace("&gt;", ">"))
    details = probe_out["details"]
    assert "aten.conv2d" in details and "features.0" in details and "Conv2d" in details
    assert "[1, 8, 8, 8]" in details and "features.0.weight" in details
    assert "stride" in details and "test_inspect.py" in details
    assert probe_out["selected"] == 2  # the node and its counterpart in the other graph
    assert probe_out["hits"] == 2  # batch_norm before and after
    assert probe_out["dim"] == 15 - 2
