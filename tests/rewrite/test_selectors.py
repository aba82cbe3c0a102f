"""Selectors by op kind, path glob and regex; matching nothing is an error."""
from __future__ import annotations

import pytest

from gradrewrite.errors import ConfigError
from gradrewrite.rewrite.graph import module_path
from gradrewrite.rewrite.selectors import Selector


def paths(nodes):
    return [module_path(n) for n in nodes]


def test_by_op_kind(convbn_graph):
    assert paths(Selector.all_of("conv").select(convbn_graph)) == ["features.0", "features.3", "shared"]
    assert paths(Selector.all_of("linear", "conv").select(convbn_graph)) == ["features.0", "features.3", "shared", "head"]
    assert paths(Selector.parse("aten.relu").select(convbn_graph)) == ["features.2"]


def test_by_path_and_regex(convbn_graph):
    assert paths(Selector.parse("path:features.*").select(convbn_graph)) == ["features.0", "features.1", "features.2", "features.3", "features.4"]
    assert paths(Selector.parse("re:^head").select(convbn_graph)) == ["head", "head_bn"]
    # op and path together narrow
    assert paths(Selector(ops=("conv",), paths=("features.*",)).select(convbn_graph)) == ["features.0", "features.3"]
    assert paths(Selector.all_of("conv").excluding("shared").select(convbn_graph)) == ["features.0", "features.3"]


def test_nothing_matched_is_loud(convbn_graph):
    with pytest.raises(ConfigError) as e:
        Selector.parse("path:encoder.*").select(convbn_graph, what="fold-bn")
    msg = str(e.value)
    assert "matches no layer" in msg and "features.0" in msg and "conv" in msg


@pytest.mark.parametrize("bad", ["op:", "weird:x", "re:("])
def test_bad_selector_text(bad):
    with pytest.raises(ConfigError):
        Selector.parse(bad)
