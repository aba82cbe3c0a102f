"""The HTML inspector's initial view, measured in a real headless Chromium.

A quantized graph is much wider than its float original (QDQ pairs and weight
dequantizes sit beside each conv). The page must still open at a legible zoom, with
no node cut off on the left or top, and both panes must open the same way. A probe
script appended after the page's own reads the layout back (zoom from the viewport's
transform, node boxes from getBoundingClientRect) into the DOM for --dump-dom.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from examples.models import small_cnn
from gradrewrite.compiler import run_pipeline
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.inspect import describe, diff, render_html
from gradrewrite.rewrite.inspect.html import compute_layout
from gradrewrite.rewrite.registry import PassContext
from tests.rewrite.test_inspect import _browser, _text_of

# The smallest label is 9px (annotation notes) or 9.5px (module line): below ~7px on
# screen it cannot be read, hence a floor on the zoom the page may open at.
MIN_LABEL_PX = 7.0
MIN_ZOOM = 0.75

PROBE = """<script>
(function () {
  function box(r) { return [r.left, r.top, r.right, r.bottom]; }
  var out = {};
  document.querySelectorAll('svg.canvas').forEach(function (svg) {
    var vp = svg.querySelector('.viewport');
    var m = /scale\\(([-\\d.e]+)\\)/.exec(vp.getAttribute('transform') || '');
    var rail = svg.parentNode.querySelector('.rail');
    var pane = box(svg.getBoundingClientRect());
    if (rail && rail.getBoundingClientRect().width) pane[2] = rail.getBoundingClientRect().left;
    var minFont = Infinity;
    svg.querySelectorAll('g.node text').forEach(function (t) {
      minFont = Math.min(minFont, t.getBoundingClientRect().height ? parseFloat(getComputedStyle(t).fontSize) : Infinity);
    });
    out[svg.getAttribute('data-view')] = {
      k: m ? +m[1] : 1, pane: pane, content: box(vp.getBoundingClientRect()), minFont: minFont,
      nodes: Array.prototype.map.call(svg.querySelectorAll('g.node'), function (g) {
        return box(g.getBoundingClientRect());
      })
    };
  });
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""

ACTIONS = {
    "fit": "document.getElementById('zoom-fit').click();",
    "after-only": "document.querySelector('#mode button[data-mode=after]').click();",
}


@pytest.fixture(scope="module")
def quantized_pair():
    model, (x,) = small_cnn()
    graph = capture(model, (x,))
    gen = torch.Generator().manual_seed(3)
    calib = [(torch.randn(1, 3, 32, 32, generator=gen),) for _ in range(4)]
    q = graph.clone()
    run_pipeline(q, "fold-bn,quantize(mode=static)", ctx=PassContext(calibration=calib))
    return describe(graph, title="small_cnn"), describe(q, title="small_cnn")


def _measure(tmp_path, page: str, action: str = "", size: str = "1400,900") -> dict:
    script = f"<script>{action}</script>" if action else ""
    path = tmp_path / "view.html"
    path.write_text(page.replace("</body>", script + PROBE + "</body>"), encoding="utf-8")
    dom = _browser(tmp_path, path, f"--window-size={size}", "--dump-dom")
    assert 'data-ready="1"' in dom
    assert _text_of(dom, "js-errors").strip() == ""
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m, "the probe did not run"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def _check_not_clipped(view: dict, name: str) -> None:
    left, top, right, bottom = view["pane"]
    cl, ct, cr, cb = view["content"]
    assert cl >= left - 0.5, f"{name}: drawing starts {left - cl:.0f}px left of the pane"
    assert ct >= top - 0.5, f"{name}: drawing starts {top - ct:.0f}px above the pane"
    for nl, nt, nr, nb in view["nodes"]:
        assert nl >= left - 0.5 and nt >= top - 0.5, f"{name}: a node is cut off at {nl:.0f},{nt:.0f}"
    # Something is on screen: the view does not open on empty space.
    assert any(nl < right and nr > left and nt < bottom and nb > top
               for nl, nt, nr, nb in view["nodes"]), f"{name}: no node in view"


def _check_legible(view: dict, name: str) -> None:
    assert view["k"] >= MIN_ZOOM, f"{name}: opens at zoom {view['k']:.2f}"
    assert view["minFont"] * view["k"] >= MIN_LABEL_PX, (
        f"{name}: smallest label {view['minFont'] * view['k']:.1f}px on screen")


def test_quantized_diff_opens_legible_and_unclipped(quantized_pair, tmp_path):
    before, after = quantized_pair
    page = render_html(after, diff(before, after))
    views = _measure(tmp_path, page, size="1000,800")  # a laptop-sized window
    assert set(views) == {"before", "after"}
    # The quantized side cannot fit the pane at a legible zoom: the test needs that case.
    after_w = float(re.search(r'data-view="after" data-width="([\d.]+)"', page).group(1))
    assert after_w * MIN_ZOOM > views["after"]["pane"][2] - views["after"]["pane"][0]
    for name, view in views.items():
        _check_legible(view, name)
        _check_not_clipped(view, name)
    # Both panes open the same way: one zoom, so the two graphs compare at one scale.
    assert views["before"]["k"] == pytest.approx(views["after"]["k"])


def test_single_graph_and_after_only_mode(quantized_pair, tmp_path):
    _, after = quantized_pair
    view = _measure(tmp_path, render_html(after), size="1000,800")["after"]
    _check_legible(view, "single")
    _check_not_clipped(view, "single")

    before, after = quantized_pair
    views = _measure(tmp_path, render_html(after, diff(before, after)), ACTIONS["after-only"],
                     size="1000,800")
    _check_legible(views["after"], "after-only")
    _check_not_clipped(views["after"], "after-only")


def test_fit_button_shows_the_whole_drawing(quantized_pair, tmp_path):
    """Fit (asked for explicitly) may go below the legible zoom, but must show every
    side of the drawing, the leftmost nodes included."""
    before, after = quantized_pair
    views = _measure(tmp_path, render_html(after, diff(before, after)), ACTIONS["fit"])
    for name, view in views.items():
        left, top, right, bottom = view["pane"]
        cl, ct, cr, cb = view["content"]
        assert cl >= left - 0.5 and ct >= top - 0.5, name
        assert cr <= right + 0.5 and cb <= bottom + 0.5, name


def test_small_graph_fits_whole_at_legible_zoom(quantized_pair, tmp_path):
    """A tall window: the float graph fits whole, so it opens whole and centred."""
    before, _ = quantized_pair
    view = _measure(tmp_path, render_html(before), size="1400,2400")["after"]
    _check_legible(view, "float")
    left, top, right, bottom = view["pane"]
    cl, ct, cr, cb = view["content"]
    assert cl >= left - 0.5 and ct >= top - 0.5 and cr <= right + 0.5 and cb <= bottom + 0.5


def test_quantized_layout_does_not_step_sideways(quantized_pair):
    """Each quantized conv reads a weight dequantize (a source) beside its input: the
    main flow must stay in one column rather than step a node right per layer."""
    before, after = quantized_pair
    wide, narrow = compute_layout(after).width, compute_layout(before).width
    assert wide < 2 * narrow, f"quantized graph {wide}px wide, float one {narrow}px"
