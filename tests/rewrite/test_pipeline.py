"""Pipelines as data: string grammar, TOML recipes, registry validation."""
from __future__ import annotations

import pytest

from gradrewrite.errors import ConfigError
from gradrewrite.rewrite.pipeline import build_passes, load_recipe, parse_pipeline
from gradrewrite.rewrite.registry import make_pass, pass_options, registered_passes


def test_parse_string():
    specs = parse_pipeline("fold-bn, dce ,fold-bn(select='re:features\\.(0|3)')")
    assert [s.name for s in specs] == ["fold-bn", "dce", "fold-bn"]
    assert specs[2].options == {"select": "re:features\\.(0|3)"}
    assert parse_pipeline("x(a=1, b=0.5, c=true, d=abc)")[0].options == {"a": 1, "b": 0.5, "c": True, "d": "abc"}


@pytest.mark.parametrize("bad,match", [
    ("fold-bn(", "unbalanced"),
    ("fold-bn(select)", "not key=value"),
    ("fold bn", "bad pass name"),
    ("dce(x=1", "unbalanced"),
])
def test_parse_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        parse_pipeline(bad)


def test_unknown_pass_lists_valid():
    with pytest.raises(ConfigError) as e:
        build_passes(parse_pipeline("dce,fold-nb"))
    assert "fold-nb" in str(e.value) and "fold-bn" in str(e.value) and "dce" in str(e.value)


def test_unknown_option_lists_valid():
    with pytest.raises(ConfigError, match="no option 'bits'.*valid options: select"):
        make_pass("fold-bn", {"bits": 3})


def test_option_type_checked():
    from dataclasses import dataclass

    from gradrewrite.rewrite.registry import register_pass

    @register_pass("test-typed")
    @dataclass(frozen=True)
    class Typed:
        n: int = 2
        ratio: float = 0.5
        flag: bool = False

        def run(self, graph, ctx): ...

    p = make_pass("test-typed", {"n": "4", "ratio": 1, "flag": "true"})
    assert (p.n, p.ratio, p.flag) == (4, 1.0, True)
    with pytest.raises(ConfigError, match="not a valid int"):
        make_pass("test-typed", {"n": "four"})
    with pytest.raises(ConfigError, match="not a valid bool"):
        make_pass("test-typed", {"flag": "maybe"})
    with pytest.raises(ConfigError, match="not a valid int"):
        make_pass("test-typed", {"n": 2.5})


def test_registry_has_core_passes():
    passes = registered_passes()
    assert {"dce", "fold-bn"} <= set(passes)
    assert passes["fold-bn"].requires == ("eval-mode",)
    assert [o[0] for o in pass_options(passes["fold-bn"])] == ["select"]


def test_recipe(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[pass]]\nname = "fold-bn"\nselect = "path:features.*"\n\n[[pass]]\nname = "dce"\n')
    specs = load_recipe(path)
    assert [(s.name, s.options) for s in specs] == [("fold-bn", {"select": "path:features.*"}), ("dce", {})]
    assert [p.name for p in build_passes(specs)] == ["fold-bn", "dce"]


@pytest.mark.parametrize("text,match", [
    ("[[pass]\nname=", "not valid TOML"),
    ("title = 'x'\n", "no \\[\\[pass\\]\\]"),
    ("[[pass]]\nbits = 3\n", "has no name"),
])
def test_bad_recipe(tmp_path, text, match):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_recipe(path)


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")
