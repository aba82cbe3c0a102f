"""`--dynamic-batch` / `--input Bx…`: one artifact that runs at any batch size (torch, ort, tvm)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import gradrewrite as gr
from gradrewrite.errors import ConfigError, GradrewriteError

from .conftest import assert_user_error, run_cli

TESTS = Path(__file__).resolve().parents[1]
BACKENDS = [("torch", ()), ("ort", ()), ("tvm", ("--tune-trials", "0"))]


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * (1 + np.abs(ref).max())


def _run_at(tmp_path: Path, out: Path, arrays, name: str) -> np.ndarray:
    """`gradrewrite run` on these arrays (one .npz, inputs in order); returns output_0."""
    np.savez(tmp_path / f"{name}.npz", *arrays)
    run_cli("run", out, "--input", tmp_path / f"{name}.npz", "-o", tmp_path / f"{name}_y.npz", check=True)
    return np.load(tmp_path / f"{name}_y.npz")["output_0"]


def _assert_dynamic_files(out: Path, backend: str) -> None:
    """The backend's own file keeps the batch symbolic."""
    if backend == "torch":
        from gradrewrite.rewrite.safe_load import load_exported_program
        ep = load_exported_program(out / "model.pt2")
        x = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "x")
        assert not isinstance(x.meta["val"].shape[0], int)
    elif backend == "ort":
        dim0 = onnx.load(str(out / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
        assert dim0.dim_param and not dim0.dim_value
    else:
        meta = json.loads((out / "tvm_meta.json").read_text())
        assert meta["dynamic_batch"] is True and meta["static_entry"] is None   # untuned: one entry


@pytest.mark.slow
@pytest.mark.parametrize("backend,flags", BACKENDS, ids=[b for b, _ in BACKENDS])
def test_cnn_runs_at_any_batch(tmp_path, convbn_pt2, convbn_model, backend, flags):
    out = tmp_path / "out"
    proc = run_cli("compile", convbn_pt2, "-p", "fold-bn,dce", "--dynamic-batch", "-b", backend, *flags,
                   "-o", out, check=True)
    assert "at batches 2 and 1 (dynamic batch" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["inputs"][0]["shape"] == ["B", 3, 12, 12]
    assert report["dynamic_batch"] == {"min": 1, "max": 4096, "example": 2, "verified": [2, 1]}
    v = report["verification"]
    assert [b["batch"] for b in v["batches"]] == [2, 1] and v["inputs_compared"] == 6
    assert v["checked"] and v["relative_error"] < 1e-5
    assert report["passes"][0]["report"]["folded"] == 3      # passes work on the symbolic graph
    _assert_dynamic_files(out, backend)

    gen = torch.Generator().manual_seed(3)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 12, 12, generator=gen)
        _close(_run_at(tmp_path, out, [x.numpy()], f"b{batch}"), convbn_model(x).detach().numpy())


def _zoo_module(tmp_path: Path) -> None:
    (tmp_path / "zoo_mod.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
        "from model_zoo import hf_bert, hf_gpt2\n"
        "def bert():\n    return hf_bert(seq=16)\n"
        "def gpt2():\n    return hf_gpt2(seq=16)\n")


@pytest.mark.parametrize("model,backend,flags", [("bert", *BACKENDS[0]), ("bert", *BACKENDS[1]),
                                                 ("bert", *BACKENDS[2]), ("gpt2", *BACKENDS[2])],
                         ids=["bert-torch", "bert-ort", "bert-tvm", "gpt2-tvm"])
@pytest.mark.slow
def test_transformer_runs_at_any_batch(tmp_path, model, backend, flags):
    import sys
    sys.path.insert(0, str(TESTS))
    from model_zoo import hf_bert, hf_gpt2

    _zoo_module(tmp_path)
    out = tmp_path / "out"
    # BERT marks each input with the B form, GPT-2 uses the flag (its example has batch 1: traced at 2)
    how = ["--input", "Bx16:int64", "--input", "Bx16:int64"] if model == "bert" else ["--dynamic-batch"]
    run_cli("compile", "--module", f"zoo_mod:{model}", *how, "-b", backend, *flags, "-o", out,
            cwd=tmp_path, check=True)
    report = json.loads((out / "report.json").read_text())
    assert [i["shape"] for i in report["inputs"]] == [["B", 16]] * len(report["inputs"])
    assert report["dynamic_batch"]["verified"] == [2, 1] and report["verification"]["relative_error"] < 1e-4

    eager, _ = (hf_bert if model == "bert" else hf_gpt2)(seq=16)
    gen = torch.Generator().manual_seed(5)
    for batch in (1, 5):
        ids = torch.randint(0, 256, (batch, 16), generator=gen)
        inputs = [ids, (torch.arange(16) < 12).long().repeat(batch, 1)] if model == "bert" else [ids]
        with torch.no_grad():
            ref = eager(*inputs).numpy()
        _close(_run_at(tmp_path, out, [t.numpy() for t in inputs], f"b{batch}"), ref)

    if model == "bert" and backend == "torch":  # one batch, shared by every input
        np.savez(tmp_path / "mixed.npz", np.zeros((5, 16), np.int64), np.ones((3, 16), np.int64))
        assert_user_error(run_cli("run", out, "--input", tmp_path / "mixed.npz", "-o", tmp_path / "m.npz"),
                          "batch sizes differ", "input_ids 5", "attention_mask 3")


@pytest.mark.slow
def test_tvm_tuned_at_the_example_batch(tmp_path, convbn_pt2, convbn_model):
    """MetaSchedule tunes static shapes: the library gets a tuned entry for the example
    batch next to the dynamic one, and the runner picks by shape."""
    out = tmp_path / "out"
    run_cli("compile", convbn_pt2, "--dynamic-batch", "-b", "tvm", "--tune-trials", "8",
            "--tune-cache", tmp_path / "cache", "-o", out, check=True)
    report = json.loads((out / "report.json").read_text())
    assert report["artifact"]["dynamic_batch"]["tuned_batch"] == 2
    assert json.loads((out / "tvm_meta.json").read_text())["static_entry"] == "main_example_batch"
    for batch in (2, 5):   # the tuned entry, then the dynamic one
        x = torch.randn(batch, 3, 12, 12)
        _close(_run_at(tmp_path, out, [x.numpy()], f"b{batch}"), convbn_model(x).detach().numpy())


@pytest.mark.parametrize("args,needle", [
    (("--dynamic-batch", "-b", "mcu"), "--backend mcu"),
    (("--input", "Bx3x12x12", "-b", "mcu"), "--backend mcu"),
    (("--dynamic-batch", "--train"), "--train captures a training step"),
    (("--dynamic-batch", "-p", "stream-bp"), "stream-bp"),
], ids=["mcu-flag", "mcu-spec", "train", "stream-bp"])
def test_refused_before_capture(tmp_path, convbn_pt2, args, needle):
    assert_user_error(run_cli("compile", convbn_pt2, *args, "-o", tmp_path / "o"), needle, "dynamic batch")
    assert not (tmp_path / "o").exists()


def test_fixed_shape_artifact_refuses_other_batch(tmp_path, convbn_pt2):
    out = tmp_path / "out"
    run_cli("compile", convbn_pt2, "-o", out, "-q", check=True)
    assert "dynamic_batch" not in json.loads((out / "report.json").read_text())
    np.save(tmp_path / "x.npy", np.zeros((5, 3, 12, 12), np.float32))
    assert_user_error(run_cli("run", out, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz"),
                      "is 5x3x12x12:float32", "compiled for 2x3x12x12:float32", "--dynamic-batch")


def test_model_that_fixes_its_batch(tmp_path):
    (tmp_path / "fixed_mod.py").write_text(
        "import torch\n"
        "class Flat(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(48, 2)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.reshape(2, -1))\n"
        "def build():\n"
        "    return Flat(), (torch.randn(2, 3, 4, 4),)\n")
    proc = run_cli("compile", "--module", "fixed_mod:build", "--dynamic-batch", "-o", tmp_path / "o", cwd=tmp_path)
    assert_user_error(proc, "fixes its batch size to 2 at", "fixed_mod.py:7", "reshape(2, -1)", "drop --dynamic-batch")
    assert not (tmp_path / "o").exists()


def test_python_api(tmp_path, convbn_pt2, convbn_model):
    graph = gr.load(convbn_pt2, dynamic_batch=True)
    assert graph.dynamic_batch and graph.inputs[0].describe() == "x: Bx3x12x12:float32"
    art = gr.compile(graph, tmp_path / "o", passes="fold-bn,dce", backend="ort")
    x = torch.randn(7, 3, 12, 12)
    _close(art(x)[0], convbn_model(x).detach().numpy())
    with pytest.raises(GradrewriteError, match="compiled for Bx3x12x12:float32"):
        art(np.zeros((7, 3, 11, 12), np.float32))          # fixed dims stay fixed
    with pytest.raises(GradrewriteError, match=r"outside the artifact's dynamic batch range 1\.\.4096"):
        art(np.zeros((0, 3, 12, 12), np.float32))
    with pytest.raises(ConfigError, match="mcu"):
        gr.compile(convbn_model, tmp_path / "m", example_inputs=(x,), backend="mcu", dynamic_batch=True)
    # a batch-1 example is traced at batch 2 (torch.export fixes size-1 dims)
    art = gr.compile(convbn_model, tmp_path / "b1", example_inputs=(torch.randn(1, 3, 12, 12),), dynamic_batch=True)
    assert art.report["dynamic_batch"]["example"] == 2 and art.report["verification"]["relative_error"] < 1e-5
