"""Capture: every model source becomes the same ATen graph with module paths."""
from __future__ import annotations

import pytest
import torch

from gradrewrite.errors import InputError
from gradrewrite.rewrite.capture import load_model, parse_input_spec
from gradrewrite.rewrite.graph import module_path, op_kind


def test_parse_input_spec():
    s = parse_input_spec("1x3x96x96")
    assert s.shape == (1, 3, 96, 96) and s.dtype == torch.float32 and s.high is None
    s = parse_input_spec("1x128:int64:30522", 1)
    assert s.shape == (1, 128) and s.dtype == torch.int64 and s.high == 30522 and s.name == "input_1"


@pytest.mark.parametrize("bad", ["", "1x", "ax3", "1x3:floaty", "1x0x3", "1,3"])
def test_parse_input_spec_rejects(bad):
    with pytest.raises(InputError) as e:
        parse_input_spec(bad)
    assert "e.g." in e.value.one_line() or "use one of" in e.value.one_line() or "dimension" in e.value.one_line()


def test_pt2_keeps_inputs_and_module_paths(convbn_pt2):
    g = load_model(convbn_pt2)
    assert g.inputs[0].shape == (2, 3, 12, 12)
    convs = [n for n in g.call_nodes() if op_kind(n) == "conv"]
    assert [module_path(n) for n in convs] == ["features.0", "features.3", "shared"]
    assert all("stack_trace" in n.meta and "val" in n.meta for n in convs)


def test_pt2_with_new_input_shape(convbn_pt2):
    g = load_model(convbn_pt2, inputs=["1x3x20x20"])
    assert g.inputs[0].shape == (1, 3, 20, 20)
    assert g(*g.random_inputs(0))[0].shape == (1, 5)


def test_pickle_needs_trust(tmp_path, convbn_model):
    path = tmp_path / "m.pt"
    torch.save(convbn_model, path)
    with pytest.raises(InputError, match="--trust-pickle"):
        load_model(path, inputs=["1x3x8x8"])
    g = load_model(path, inputs=["1x3x8x8"], trust_pickle=True)
    ref = convbn_model(g.example_inputs[0])
    torch.testing.assert_close(g(*g.example_inputs)[0], ref)


def test_state_dict_is_not_a_model(tmp_path, convbn_model):
    path = tmp_path / "sd.pth"
    torch.save(convbn_model.state_dict(), path)
    with pytest.raises(InputError, match="state_dict"):
        load_model(path, inputs=["1x3x8x8"], trust_pickle=True)


def test_torchscript_loads_without_pickle_flag(tmp_path, convbn_model):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(convbn_model, torch.randn(2, 3, 8, 8)), str(path))
    g = load_model(path, inputs=["2x3x8x8"])
    convs = [n for n in g.call_nodes() if op_kind(n) == "conv"]
    assert [module_path(n) for n in convs] == ["features.0", "features.3", "shared"]
    torch.testing.assert_close(g(*g.example_inputs)[0], convbn_model(g.example_inputs[0]))


def test_module_factory(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), (torch.randn(2, 4),)\n"
        "def bare():\n"
        "    return torch.nn.Linear(4, 3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    g = load_model(module="mymodels:build")
    assert g.inputs[0].shape == (2, 4)
    with pytest.raises(InputError, match="--input"):
        load_model(module="mymodels:bare")
    assert load_model(module="mymodels:bare", inputs=["5x4"]).inputs[0].shape == (5, 4)
    with pytest.raises(InputError, match="no callable"):
        load_model(module="mymodels:missing")
    with pytest.raises(InputError, match="cannot import"):
        load_model(module="no_such_mod_xyz:build")


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    (b"", "empty"),
    (b"not a zip", "not a torch.export archive"),
])
def test_bad_pt2(tmp_path, content, match):
    path = tmp_path / "m.pt2"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        load_model(path)


def test_truncated_pt2(tmp_path, convbn_pt2):
    data = convbn_pt2.read_bytes()
    bad = tmp_path / "cut.pt2"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        load_model(bad)


def test_unknown_format(tmp_path):
    path = tmp_path / "m.h5"
    path.write_bytes(b"x")
    with pytest.raises(InputError, match="unknown model format"):
        load_model(path)


def test_wrong_input_shape_is_input_error(convbn_pt2):
    with pytest.raises(InputError, match="fixed input shapes.*3 channels"):
        load_model(convbn_pt2, inputs=["1x4x8x8"])   # 4 channels into a 3-channel conv


def test_int_inputs_bounded_by_embedding():
    from gradrewrite.rewrite.capture import capture

    class Emb(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = torch.nn.Embedding(37, 8)

        def forward(self, ids):
            return self.tok(ids.view(-1)).sum(0)

    g = capture(Emb(), (torch.zeros(1, 16, dtype=torch.long),))
    assert g.inputs[0].high == 37
    for seed in range(5):
        ids, = g.random_inputs(seed)
        assert ids.max() < 37
