"""An int8 training step with a float classifier head (mcu backend).

``quantize(mode=static,exclude=classifier)`` keeps the last linear layer float: the
device runs the backbone int8 (int8 weights and activations, QAS, integer updates) and
the head in fp32 (float logits, float gradients, ``p -= lr * g``). The host build must
equal the integer reference bit for bit, head included (the reference mirrors the float
kernels' summation orders; ``gr_linear_tr_f32`` never fuses an FMA, so Cortex-M gives the
same bits); one step's new head equals a torch SGD step of the same head on the same
(device-computed) features within fp32 rounding; the loss falls on a learnable task.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradrewrite as gr
from gradrewrite.backends.mcu.inference.lowering import Unsupported
from gradrewrite.backends.mcu.training import reference
from gradrewrite.backends.mcu.training.device_form import device_form
from gradrewrite.backends.mcu.training.host import build_train_host, run_train_host, write_train
from gradrewrite.compiler import run_pipeline
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.registry import PassContext
from gradrewrite.training import Train, capture_sgd_step
from tests.backends import test_mcu_train_cnns as cnns
from tests.backends.test_mcu_train_cnns import MBConv

RES, CLASSES, BATCH, LR = 32, 3, 2, 0.05
HEAD = "fold-bn,quantize(mode=static,exclude=classifier)"
TRAIN_HEAD = "sparse-update(bias_last=2,weights='-1:1,-2:1')"     # the head and the last conv
FROZEN_HEAD = "sparse-update(weights='-2:1,-3:1/2')"                # two convs, the head frozen
QAS = "qas(rounding=stochastic,seed=3)"


class Net(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(MBConv(8, 8, 3, 3, 1), MBConv(8, 12, 3, 3, 2), MBConv(12, 12, 3, 3, 2))
        self.classifier = nn.Linear(12, CLASSES, bias=bias)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def colour_task(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return cnns.colour_task(n, seed, res=RES)


def net(bias: bool = True) -> nn.Module:
    """BN statistics from the task's images, means zero (features carry the class)."""
    torch.manual_seed(0)
    return cnns.bn_scales_from_data(Net(bias), colour_task(32, seed=9)[0])


def calibration():
    x = colour_task(8, seed=5)[0]
    return [(torch.from_numpy(x[i:i + BATCH]),) for i in range(0, 8, BATCH)]


def compile_head(out: Path, scheme: str, target: str = "host", quantize: str = HEAD) -> dict:
    gr.compile(net(), out, example_inputs=(torch.zeros(BATCH, 3, RES, RES),), backend="mcu",
               train=gr.Train(lr=LR), passes=f"{quantize},{scheme},{QAS}", calibration=calibration(),
               verify_inputs=1, target=target)
    return json.loads((out / "report.json").read_text())


def step_graph(scheme: str, exclude: str = "classifier", bias: bool = True):
    """The int8 training step as the compile captures it (``training.prepare``)."""
    g = capture(net(bias), (torch.zeros(BATCH, 3, RES, RES),))
    run_pipeline(g, "fold-bn", verify=False)
    run_pipeline(g, f"quantize(mode=static,outputs=all,exclude={exclude})", verify=False,
                 ctx=PassContext(calibration=calibration()))
    step = capture_sgd_step(g, Train(lr=LR))
    run_pipeline(step, scheme, verify=False)
    run_pipeline(step, QAS, verify=False)
    return step


@pytest.fixture(scope="module")
def trained_head(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("float_head") / "art"
    return out, compile_head(out, TRAIN_HEAD)


# ------------------------------------------------------------------ structure
def test_float_head_is_trained_in_fp32(trained_head):
    out, report = trained_head
    mcu = report["mcu"]
    dtypes = {p["path"]: p["dtype"] for p in mcu["trained"]}
    assert dtypes == {"blocks.2.project.0.weight_q": "int8", "blocks.2.project.0.bias": "int32",
                      "classifier.weight": "float32", "classifier.bias": "float32"}
    assert mcu["int8"] and mcu["int8_check"]["bit_exact"]
    assert report["verification"]["integer_reference"]["bit_exact"]
    kernels = {op["kernel"] for op in mcu["ops"]}
    assert {"gr_linear_tr_f32", "gr_linear_bwd_input_f32", "gr_linear_bwd_weight_f32", "gr_sgd_f32",
            "gr_sgd_s8", "gr_sgd_s32"} <= kernels
    assert "logit_headroom" not in report["train_step"]          # float logits: nothing to widen
    # SRAM: 4 bytes per float head value, 1 per int8 weight, 4 per int32 bias
    plan = report["memory_plan"]
    assert plan["trained_weights_bytes"] == 12 * 36 * 1 + 12 * 4 + (CLASSES * 12 + CLASSES) * 4
    assert plan["sram_bytes"] == plan["arena_bytes"] + plan["trained_weights_bytes"] + plan["labels_bytes"]
    model_c = (out / "mcu" / "model.c").read_text()
    assert '#include "kernels/gr_float_head.h"' in model_c


def test_frozen_float_head_stays_in_flash_as_float(tmp_path):
    report = compile_head(tmp_path / "art", FROZEN_HEAD)
    mcu = report["mcu"]
    assert {p["dtype"] for p in mcu["trained"]} == {"int8"}
    assert not any(p["path"].startswith("classifier") for p in mcu["trained"])
    assert mcu["int8_check"]["bit_exact"]
    assert "gr_linear_tr_f32" in {op["kernel"] for op in mcu["ops"]}
    calls = [ln for ln in (tmp_path / "art" / "mcu" / "model.c").read_text().splitlines()
             if "gr_linear_tr_f32(" in ln]
    assert calls and not any("p_classifier" in ln for ln in calls)     # read from flash, not SRAM
    head = (CLASSES * 12 + CLASSES) * 4                                 # float32 in flash
    assert report["memory_plan"]["frozen_weights_bytes"] >= head


def test_int8_only_steps_do_not_carry_the_float_head_kernel(tmp_path):
    """No exclude: the artifact is the int8 step of before (no float head file, no include)."""
    report = compile_head(tmp_path / "art", TRAIN_HEAD, quantize="fold-bn,quantize(mode=static)")
    assert {p["dtype"] for p in report["mcu"]["trained"]} == {"int8", "int32"}
    assert not list((tmp_path / "art" / "mcu" / "kernels").glob("gr_float_head.*"))
    assert "gr_float_head" not in (tmp_path / "art" / "mcu" / "model.c").read_text()


def test_float_layers_elsewhere_are_refused_naming_them(tmp_path):
    for exclude, scheme, match in (
            ("blocks.2.project.0", TRAIN_HEAD, r"convolution_\d+ at blocks\.2\.project\.0 is a float convolution "
                                               r"inside the int8 backbone; .*quantize it too"),
            ("classifier", "sparse-update(bias_last=2,weights='-1:1/2,-2:1')",
             r"addmm at classifier is a partially trained float classifier; .*'-1:1'")):
        with pytest.raises(Unsupported, match=match):
            write_train(step_graph(scheme, exclude), tmp_path / exclude / "mcu")


# ------------------------------------------------------------------ numerics
def test_host_step_equals_the_reference_and_torch_sgd_of_the_head(trained_head, monkeypatch):
    out, _ = trained_head
    x, y = colour_task(BATCH, seed=3)
    losses, got = run_train_host(out / "mcu", x, y, 3, LR)
    step = step_graph(TRAIN_HEAD)
    seen = []
    real = reference.lin_fwd
    monkeypatch.setattr(reference, "lin_fwd", lambda *a: seen.append(a) or real(*a))
    ref_losses, ref = reference.reference_steps(device_form(step), x, y, 3, LR, rounding="stochastic", seed=3)
    assert np.array_equal(losses, ref_losses), (losses, ref_losses)
    for path, value in got.items():   # int8, int32 and the float head: every bit
        assert value.dtype == ref[path].dtype and np.array_equal(value, ref[path]), path
    assert ref["classifier.weight"].dtype == np.float32
    # one step of the head against torch SGD on the features the device computed
    feats, w0, b0 = (torch.from_numpy(np.array(v, np.float32)) for v in seen[0])
    w = w0.clone().requires_grad_()
    b = b0.clone().requires_grad_()
    loss = F.cross_entropy(feats.reshape(BATCH, -1) @ w.t() + b, torch.from_numpy(y))
    loss.backward()
    with torch.no_grad():
        w_new, b_new = (w - LR * w.grad).numpy(), (b - LR * b.grad).numpy()
    losses1, got1 = run_train_host(out / "mcu", x, y, 1, LR)
    assert abs(float(losses1[0]) - loss.item()) <= 1e-5 * abs(loss.item())
    eps = float(np.finfo(np.float32).eps)
    for dev, tor, before in ((got1["classifier.weight"], w_new, w0.numpy()), (got1["classifier.bias"], b_new,
                                                                             b0.numpy())):
        assert np.abs(tor - before).max() > 1e3 * eps * np.abs(before).max()    # a real update
        assert np.all(np.abs(dev - tor) <= 32 * eps * np.maximum(np.abs(tor), np.abs(tor - before).max())), \
            np.abs(dev - tor).max()


def test_float_head_without_bias_is_bit_exact(tmp_path):
    """``nn.Linear(bias=False)``: the head's forward is ``mm``, ``gr_linear_tr_f32`` without bias."""
    step = step_graph("sparse-update(bias_last=1,weights='-1:1,-2:1')", bias=False)
    facts = write_train(step.clone(), tmp_path / "mcu")
    assert {p["path"]: p["dtype"] for p in facts["trained"]}["classifier.weight"] == "float32"
    build_train_host(tmp_path / "mcu")
    x, y = colour_task(BATCH, seed=6)
    losses, got = run_train_host(tmp_path / "mcu", x, y, 3, LR)
    ref_losses, ref = reference.reference_steps(device_form(step), x, y, 3, LR, rounding="stochastic", seed=3)
    assert np.array_equal(losses, ref_losses)
    assert set(got) == set(ref) and all(np.array_equal(got[p], ref[p]) for p in got)


def test_float_head_on_cortex_m7_equals_the_host_bits(tmp_path):
    from gradrewrite.backends.mcu.training.compile import compile_train
    from gradrewrite.backends.mcu.training.run import run_training

    x, y = colour_task(BATCH, seed=4)
    facts = compile_train(step_graph(TRAIN_HEAD), tmp_path / "mcu", target="cortex-m7", measure=False)
    host = run_training(tmp_path / "mcu", facts, x, y, 3, LR, target="host")
    m7 = run_training(tmp_path / "mcu", facts, x, y, 3, LR, target="cortex-m7")
    assert np.array_equal(host.losses, m7.losses)
    for p in host.params:
        assert np.array_equal(host.params[p], m7.params[p]), p


# ------------------------------------------------------------------ learning
def test_loss_falls_with_a_float_head(trained_head, tmp_path):
    out, _ = trained_head
    x, y = colour_task(24, seed=1)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    run = gr.Artifact(out).train(tmp_path / "data.npz", steps=72, save_weights=tmp_path / "w.safetensors")
    epochs = np.asarray(run.losses).reshape(6, 12).mean(axis=1)    # 12 batches of 2 per epoch
    assert np.all(np.isfinite(epochs)) and epochs[-1] < 0.75 * epochs[0], epochs
    from safetensors.numpy import load_file

    saved = load_file(tmp_path / "w.safetensors")
    assert saved["classifier.weight"].dtype == np.float32 and saved["classifier.weight"].shape == (CLASSES, 12)
