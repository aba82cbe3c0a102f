"""The example models (examples/models.py), examples/make_models.py and the HF test zoo."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import model_zoo  # noqa: E402


def _load_examples_models():
    name = "gradrewrite_examples_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


ex = _load_examples_models()

EXAMPLES = sorted(ex.FACTORIES)
ZOO = sorted(model_zoo.ZOO)


def _check_builds_and_exports(model: torch.nn.Module, inputs: tuple) -> None:
    assert isinstance(inputs, tuple) and inputs and all(isinstance(t, torch.Tensor) for t in inputs)
    assert not model.training
    with torch.no_grad():
        ref = model(*inputs)
    assert isinstance(ref, torch.Tensor) and torch.isfinite(ref).all()
    ep = torch.export.export(model, inputs)
    with torch.no_grad():
        out = ep.module()(*inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # Static shapes: no symbolic dims anywhere in the graph signature.
    assert not ep.range_constraints


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_builds_and_exports(name):
    model, inputs = ex.FACTORIES[name]()
    _check_builds_and_exports(model, inputs)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_builds_and_exports(name):
    model, inputs = model_zoo.ZOO[name]()
    _check_builds_and_exports(model, inputs)


def test_factories_are_deterministic_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    m1, x1 = ex.small_cnn()
    m2, x2 = ex.small_cnn()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(x1[0], x2[0])
    for (k1, v1), (k2, v2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    _, x3 = ex.small_cnn(seed=1)
    assert not torch.equal(x1[0], x3[0])


@pytest.mark.slow
def test_mobilenet_v2_size_matches_the_paper_table():
    # MobileNetV2 0.35 @ 128: ~1.66M params and ~20M MACs (published TF-slim table).
    model, inputs = ex.mobilenet_v2()
    assert inputs[0].shape == (1, 3, 128, 128)
    assert 1.6e6 < ex.count_params(model) < 1.75e6
    assert 19e6 < ex.count_macs(model, inputs) < 21.5e6
    # Channel rounding to multiples of 8.
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.in_channels != 3:
            assert m.in_channels % 8 == 0 and m.out_channels % 8 == 0


@pytest.mark.parametrize("name", ["small_cnn", "mobilenet_v2"])
def test_bn_running_stats_are_not_trivial(name):
    model, _ = ex.FACTORIES[name]()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert bn.running_mean.abs().max() > 1e-3
        assert (bn.running_var - 1).abs().max() > 1e-3
        assert (bn.weight - 1).abs().max() > 1e-3 and bn.bias.abs().max() > 1e-3


def test_tiny_gpt_is_causal_and_tied():
    model, (idx,) = ex.tiny_gpt()
    assert idx.dtype == torch.int64 and idx.shape == (1, 64)
    assert model.lm_head.weight is model.tok_emb.weight
    with torch.no_grad():
        full = model(idx)
        changed = idx.clone()
        changed[0, -1] = (changed[0, -1] + 1) % 512
        out = model(changed)
    assert full.shape == (1, 64, 512)
    torch.testing.assert_close(out[:, :-1], full[:, :-1], rtol=0, atol=0)  # past unaffected
    assert not torch.equal(out[:, -1], full[:, -1])


@pytest.mark.slow
def test_make_models_script(tmp_path):
    out = tmp_path / "models"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_models.py"), "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    for name in EXAMPLES:
        assert any(l.startswith(name) and ".pt2" in l for l in lines), proc.stdout

    for name in EXAMPLES:
        ep = torch.export.load(out / f"{name}.pt2")
        args, kwargs = ep.example_inputs
        model, inputs = ex.FACTORIES[name]()  # same default seed as the script
        assert not kwargs and len(args) == len(inputs)
        for a, b in zip(args, inputs):
            assert torch.equal(a, b)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(*args), model(*inputs), rtol=0, atol=0)

    import onnx
    import onnxruntime as ort

    onnx_path = out / "small_cnn.onnx"
    proto = onnx.load(onnx_path)
    onnx.checker.check_model(proto)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    model, (x,) = ex.small_cnn()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, model(x).numpy(), rtol=1e-5, atol=1e-6)
