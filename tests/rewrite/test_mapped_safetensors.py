"""Memory-mapped safetensors: the tensors equal safetensors' own reading, stay equal after
their pages are dropped, and damaged files fail as InputError naming the file."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from gradrewrite.errors import InputError
from gradrewrite.rewrite.mapped_safetensors import read_weights


@pytest.fixture
def weights_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(300, 1000, generator=gen), "a.bias": torch.randn(300, generator=gen),
               "emb": torch.randn(50, 7, generator=gen).to(torch.bfloat16), "ids": torch.arange(10),
               "empty": torch.zeros(0, 4)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return path


def test_tensors_equal_the_files_and_survive_release(weights_file):
    mapped = read_weights([weights_file])
    ref = load_file(str(weights_file))
    got = mapped.tensors()
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert mapped.nbytes == sum(t.numel() * t.element_size() for t in ref.values())
    mapped.release()
    assert mapped.files[0].release_range(got["a.weight"])
    assert not mapped.files[0].release_range(torch.randn(3))   # not a view of the file
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_no_copy_two_reads_share_memory(weights_file):
    mapped = read_weights([weights_file])
    t = mapped.tensors()["a.weight"]
    assert t.data_ptr() == mapped.tensors()["a.weight"].data_ptr()


def _header_file(tmp_path, header: dict, data: bytes = b"") -> str:
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, data, needle", [
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "outside"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, "outside"),
    ({"x": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "bad header entry"),
    ([1, 2], b"", "not a JSON object"),
])
def test_damaged_headers(tmp_path, header, data, needle):
    path = _header_file(tmp_path, header, data)
    with pytest.raises(InputError, match=needle) as exc:
        read_weights([path])
    assert "bad.safetensors" in str(exc.value) and "\n" not in str(exc.value)


def test_short_and_oversized_header(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2")
    with pytest.raises(InputError, match="too short"):
        read_weights([short])
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(InputError, match="header length"):
        read_weights([huge])
    with pytest.raises(InputError, match="does not exist"):
        read_weights([tmp_path / "nope.safetensors"])
