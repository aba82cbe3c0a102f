"""`gradrewrite inspect` end to end: every format, a diff, the HTML page in Chromium."""
from __future__ import annotations

import pytest

import json

from tests.rewrite.test_inspect import NODE_RE, _browser, _no_remote, _text_of

from .conftest import assert_user_error, run_cli


def test_table_diff(convbn_pt2):
    proc = run_cli("inspect", convbn_pt2, "-p", "fold-bn", "--diff", check=True)
    assert "features.0" in proc.stdout and "- batch_norm" in proc.stdout
    assert "compute nodes 11 -> 8" in proc.stdout
    assert "get_attr features.0.weight" not in proc.stdout   # no weight rows by default
    assert "get_attr features.0.weight" in run_cli("inspect", convbn_pt2, "--weights", check=True).stdout


@pytest.mark.slow
def test_json_and_dot_and_svg(tmp_path, convbn_pt2):
    data = json.loads(run_cli("inspect", convbn_pt2, "-f", "json", check=True).stdout)
    assert data["stats"]["nodes"] == 11
    assert any(n["module"] == "features.0" and n["kind"] == "conv" for n in data["nodes"])
    assert run_cli("inspect", convbn_pt2, "-f", "dot", check=True).stdout.startswith("digraph")
    run_cli("inspect", convbn_pt2, "-f", "svg", "-o", tmp_path / "g.svg", check=True)
    assert "<svg" in (tmp_path / "g.svg").read_text()


@pytest.mark.slow
def test_html_diff_page_in_browser(tmp_path, convbn_pt2):
    page = tmp_path / "graph.html"
    run_cli("inspect", convbn_pt2, "-p", "fold-bn,dce", "--diff", "-f", "html", "-o", page, check=True)
    html = page.read_text()
    _no_remote(html)
    dom = _browser(tmp_path, page, "--window-size=1400,900", "--dump-dom")
    assert 'data-ready="1"' in dom
    assert _text_of(dom, "node-count").strip() == "8"
    assert _text_of(dom, "node-count-before").strip() == "11"
    assert _text_of(dom, "js-errors").strip() == ""
    assert len(NODE_RE.findall(dom)) >= 8 + 11                # both sides drawn


@pytest.mark.slow
def test_inspect_errors(tmp_path, convbn_pt2):
    assert_user_error(run_cli("inspect", convbn_pt2, "--diff"), "--diff needs --passes")
    assert_user_error(run_cli("inspect", tmp_path / "x.pt2"), "does not exist")
    assert_user_error(run_cli("inspect", convbn_pt2, "-p", "nope"), "unknown pass")
