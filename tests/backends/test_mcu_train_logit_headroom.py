"""The int8 training step's logit headroom (``Train.logit_headroom``, issue 19 follow-up).

Static calibration sees the untrained model: a fresh classifier head gives small logits,
so the logits' int8 range is narrow and fine-tuning saturates it (the top logits clamp
at the int8 maximum and tie; the quantizer passes no gradient past it). The int8 step
widens that one quantizer's range by ``logit_headroom`` (default 8): a different output
scale, read alike by the torch step, the integer reference and the generated C.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx

import gradrewrite as gr
from gradrewrite.compiler import run_pipeline
from gradrewrite.errors import ConfigError
from gradrewrite.passes.qas import round_int8
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.pipeline import parse_pipeline
from gradrewrite.rewrite.train_step import apply_step
from gradrewrite.training import Train, prepare

aten = torch.ops.aten
SCHEME = "sparse-update(bias_last=2,weights='-1:1,-2:1'),qas"


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g)
    calib = [(torch.randn(32, 8, generator=g),) for _ in range(2)]
    return x, x[:, :4].argmax(1), calib   # a separable 4-class task


def int8_step(headroom: float, lr: float = 0.5):
    x, y, calib = data()
    step, _ = prepare(capture(net(), (x,)), parse_pipeline("quantize(mode=static)"),
                      Train(lr=lr, logit_headroom=headroom), backend="mcu", calibration=calib)
    run_pipeline(step, SCHEME, verify=False)
    return step, x, y


def logits_quantizer(step) -> fx.Node:
    """The fake quantizer whose output the loss (log_softmax) reads."""
    soft = next(n for n in step.graph.nodes if n.target == aten._log_softmax.default)
    src = soft.args[0]
    while src.target not in (aten.fake_quantize_per_tensor_affine_cachemask.default,):
        src = src.args[0]
    return src


def logits(step, x, y) -> torch.Tensor:
    """The int8 logits (dequantized) the step's loss reads."""
    soft = next(n for n in step.graph.nodes if n.target == aten._log_softmax.default)
    seen = {}

    class Watch(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is soft.args[0]:
                seen["v"] = out.detach().clone()
            return out

    Watch(step.gm).run(x, y)
    return seen["v"]


def train(step, x, y, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        losses.append(float(apply_step(step, step(x, y))))
        round_int8(step)
    return losses


def test_logit_range_is_widened_by_the_headroom():
    narrow, _, _ = int8_step(1.0)
    wide, _, _ = int8_step(8.0)
    qn, qw = logits_quantizer(narrow), logits_quantizer(wide)
    assert qw.args[1] == pytest.approx(8 * qn.args[1]) and qw.args[2:5] == qn.args[2:5]
    info = wide.meta["train_step"]["logit_headroom"]
    assert info["factor"] == 8.0 and info["calibrated_scale"] == pytest.approx(qn.args[1])
    assert "logit_headroom" not in narrow.meta["train_step"]
    # every other quantizer keeps its calibrated scale
    others = lambda s: [n.args[1:5] for n in s.graph.nodes  # noqa: E731
                        if n.target == aten.fake_quantize_per_tensor_affine_cachemask.default
                        and n is not logits_quantizer(s)]
    assert others(narrow) == others(wide)
    assert Train().logit_headroom == 8.0
    with pytest.raises(ConfigError, match="below 1"):
        Train(logit_headroom=0.5)


def test_trained_logits_saturate_without_headroom_and_not_with_it():
    """60 steps on a separable batch (torch step, integers rounded after each step as the
    device stores them): with the calibrated range, many top logits sit at the int8
    maximum (observed 44 %) and the loss stalls (0.73); with headroom 8 no logit reaches
    the widened maximum, top logits pass the calibrated one and the loss goes lower (0.56)."""
    results = {}
    for h in (1.0, 8.0):
        step, x, y = int8_step(h)
        q = logits_quantizer(step)
        scale, zp, qmin, qmax = q.args[1:5]
        losses = train(step, x, y, 60)
        top = logits(step, x, y).max(-1).values
        results[h] = (losses[-1], top, (qmax - zp) * scale)
    loss1, top1, hi1 = results[1.0]
    loss8, top8, hi8 = results[8.0]
    assert float((top1 >= hi1 - 1e-6).float().mean()) > 0.3          # saturated before
    assert float((top8 >= hi8 - 1e-6).float().mean()) == 0.0          # not at the widened max
    assert float((top8 > hi1 + 1e-6).float().mean()) > 0.3            # past the calibrated max
    assert loss8 < loss1 - 0.1


def test_compile_with_headroom_passes_its_checks(tmp_path):
    """The compiled int8 step (host C, default headroom 8): bit-exact against the integer
    reference and checked against the torch step (the compile fails otherwise); the
    manifest records the headroom."""
    x, y, calib = data()
    art = gr.compile(net(), tmp_path / "art", example_inputs=(x,), passes="quantize(mode=static)," + SCHEME,
                     backend="mcu", train=gr.Train(lr=0.5), calibration=calib,
                     target="host", verify_inputs=1)
    assert art.report["mcu"]["int8"] and art.report["mcu"]["int8_check"]["bit_exact"]
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["config"]["train"]["logit_headroom"] == 8.0
