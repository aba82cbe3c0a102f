"""benchmarks/scale.py's second target: time at most linear in the parameter count."""
from benchmarks.scale import LINEAR_SLACK, linearity


def _row(model, params, wall, pipeline="gptq-4bit", **extra):
    return {"model": model, "parameters": params, "wall_s": wall, "pipeline": pipeline, **extra}


def test_linearity_judges_wall_per_parameter_against_the_smallest_model():
    rows = [_row("b", 2_000_000, 18.0), _row("a", 1_000_000, 10.0), _row("c", 4_000_000, 50.0),
            _row("a", 1_000_000, 5.0, pipeline="fp32"), _row("b", 2_000_000, 9.0, pipeline="fp32"),
            _row("a", 1_000_000, 1.0, pipeline="rtn-4bit"),   # one model only: not judged
            _row("c", 4_000_000, 1.0, pipeline="rtn-4bit", error="killed")]
    got = {g["pipeline"]: g for g in linearity(rows)}
    assert sorted(got) == ["fp32", "gptq-4bit"]
    g = got["gptq-4bit"]
    assert g["models"] == ["a", "b", "c"] and g["over_smallest"] == [1.0, 0.9, 1.25]
    assert 1.25 > LINEAR_SLACK and not g["holds"]          # c: 4x the parameters, 5x the time
    assert got["fp32"]["holds"] and got["fp32"]["over_smallest"] == [1.0, 0.9]
