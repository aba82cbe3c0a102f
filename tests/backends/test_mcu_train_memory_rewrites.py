"""The memory rewrites of the int8 training step (issue 19, item 4): each must leave the
step's results bit for bit as they were and lower the planned arena.

- the global average pool reads its int8 input (``gr_reduce_s8_f32``: no float copy), and
  is made with the conv before it and that conv's masks one chunk of output channels at a
  time (``int8.pool_chunks``: the conv's output never stored whole);
- its backward (a per-channel gradient broadcast over the plane and masked) is never
  stored whole: the conv backward reads it in channel chunks (``int8.conv_bwd_bcast``);
- a stride-1 depthwise conv's input gradient is written over its output gradient
  (``gr_dw_bwd_input_ws8_f32``, one plane of scratch);
- an int8 weight's gradient is made one row at a time by its update (fused update);
- an inverted residual block's backward (frozen or partially trained project / expand
  weights) runs one expanded channel at a time (``gr_ir_bwd_s8_f32``): no expanded gradient
  is stored, only the channels a partially trained expand's weight gradient reads;
- the frozen first stage runs patch by patch (``training/patches.py``, the inference
  planner's C path), reading its input window by window (not held in SRAM).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradrewrite.backends.mcu.inference.codegen import plan_arena
from gradrewrite.backends.mcu.training.device_form import device_form
from gradrewrite.backends.mcu.training.host import build_train_host, run_train_host, write_train
from gradrewrite.backends.mcu.training.lowering import lower_train
from gradrewrite.backends.mcu.training.lowering.lowerer import TrainLowerer
from gradrewrite.backends.mcu.training.memory import plan_step_arena
from gradrewrite.backends.mcu.training.patches import lower_step, patch_step
from gradrewrite.backends.mcu.training.reference import reference_steps

from .test_mcu_train_int8 import int8_step

LR = 0.05
STEPS = 3
REWRITES = ("int8_reduce", "bcast_grads", "inplace_dw_bwd", "fused_update", "ir_bwd", "chunked_pool")


class PatchNet(torch.nn.Module):
    """A frozen high-resolution stem (three stride-2 convs and a pointwise one), then the
    trained part (frozen weights, trained biases unless said): an inverted residual block
    (pointwise expand, stride-1 depthwise, pointwise project, skip), a 3x3 conv (half its
    filters trained), a stride-1 depthwise and a pointwise conv, relu6 throughout, a
    global average pool and a linear head (weight trained)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.down2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.mix = nn.Conv2d(16, 16, 1)
        self.expand = nn.Conv2d(16, 40, 1)
        self.dw1 = nn.Conv2d(40, 40, 3, padding=1, groups=40)
        self.project = nn.Conv2d(40, 16, 1)
        self.conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 48, 1)
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        r6 = torch.nn.functional.relu6
        x = r6(self.mix(r6(self.down2(r6(self.down(r6(self.stem(x))))))))
        x = x + self.project(r6(self.dw1(r6(self.expand(x)))))
        x = r6(self.pw(r6(self.dw(r6(self.conv(x))))))
        return self.head(x.mean((2, 3)))


# head weight and bias, pw / dw / conv / project / dw1 / expand biases, half of conv's filters
SCHEME = "sparse-update(bias_last=7,weights='-1:1,-4:1/2')"


def batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 3, 96, 96, generator=g), torch.tensor([3])


@pytest.fixture(scope="module")
def step():
    x, y = batch()
    return int8_step(PatchNet(), x, y, SCHEME, "qas(rounding=stochastic,seed=4)", lr=LR)


@pytest.fixture
def unfused(monkeypatch):
    """Every memory rewrite of the lowering off (the lowering as it was before them)."""
    def off():
        for flag in REWRITES:
            monkeypatch.setattr(TrainLowerer, flag, False)
    return off


def _arena(tp) -> int:
    return plan_step_arena(tp).plan.arena_bytes


def test_rewrites_fire_and_lower_the_arena(step, unfused):
    tp = lower_step(step.clone())
    steps = tp.program.steps
    kernels = [s.kernel for s in steps]
    assert not any("float copy for aten.mean" in s.op for s in steps)
    pooled = [s for s in steps if "per chunk of output channels" in s.op]      # pw, its masks and the mean
    assert len(pooled) == 1 and "gr_reduce_s8_f32" in pooled[0].code and "gr_mask_bits_s8" in pooled[0].code
    assert "gr_reduce_s8_f32" not in kernels
    assert sum("masked broadcast gradient" in s.op for s in steps) == 1          # pw: input and bias gradients
    assert kernels.count("gr_dw_bwd_input_ws8_f32") == 1                         # dw, stride 1
    ir = [s for s in steps if s.kernel == "gr_ir_bwd_s8_f32"]                    # project <- dw1 <- expand
    assert [s.path for s in ir] == ["project"] and "NULL, &se" not in ir[0].code  # dw1's bias gradient made
    assert not any(s.path in ("dw1", "expand") and "convolution_backward" in s.op for s in steps)
    fused = [s for s in steps if "fused update" in s.op]
    assert sorted(s.path for s in fused) == ["conv", "head"]                     # both trained int8 weights
    assert not {"gr_conv2d_bwd_weight_xs8_f32", "gr_linear_bwd_weight_xs8_f32"} & {
        s.kernel for s in steps if "fused" not in s.op}
    report = tp.program.notes["patches"]
    assert report["applied"] and kernels.count("gr_patch_read") == report["patches"] > 1
    assert report["split_path"] and report["arena_bytes"] < report["arena_unpatched_bytes"]
    on = _arena(tp)
    rewrites_only = _arena(patch_step(lower_train(step.clone()), "off")[0])
    unfused()
    tp_off = lower_train(step.clone())
    assert not any("fused update" in s.op or "masked broadcast" in s.op for s in tp_off.program.steps)
    off = _arena(tp_off)
    assert on < rewrites_only <= off, (on, rewrites_only, off)
    # each rewrite alone never raises the arena
    for flag in REWRITES:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(TrainLowerer, flag, True)
            assert _arena(lower_train(step.clone())) <= off


def _run(step, project, patches: str, stream_input: bool = True):
    x, y = batch()
    facts = write_train(step.clone(), project, patches=patches, stream_input=stream_input)
    build_train_host(project)
    losses, params = run_train_host(project, x.numpy(), y.numpy(), STEPS, LR)
    return facts, losses, params


@pytest.mark.slow
def test_rewritten_step_is_bit_exact(step, unfused, tmp_path):
    """The rewritten step (patches on, the input read window by window, or kept in the
    arena) and the step without any rewrite (patches off) against each other and the
    integer reference: every loss and parameter, every step."""
    facts_on, losses_on, on = _run(step, tmp_path / "on", "on")
    assert facts_on["patches"]["applied"] and not facts_on["memory_plan"]["input_in_arena"]
    assert "#define MODEL_INPUT_STREAMED 1" in (tmp_path / "on" / "model.h").read_text()
    facts_held, losses_held, held = _run(step, tmp_path / "held", "on", stream_input=False)
    assert facts_held["patches"]["applied"] and facts_held["memory_plan"]["input_in_arena"]
    unfused()
    facts_off, losses_off, off = _run(step, tmp_path / "off", "off")
    assert not facts_off["patches"]["applied"]
    assert facts_on["arena_bytes"] < facts_off["arena_bytes"]
    x, y = batch()
    ref_losses, ref = reference_steps(device_form(step), x.numpy(), y.numpy(), STEPS, LR, rounding="stochastic",
                                      seed=4)
    assert np.array_equal(losses_on, losses_off) and np.array_equal(losses_on, ref_losses), (losses_on, ref_losses)
    assert np.array_equal(losses_held, ref_losses)
    assert set(on) == set(off) == set(held) == set(ref)
    for path in ref:
        assert np.array_equal(on[path], ref[path]), path
        assert np.array_equal(held[path], ref[path]), path
        assert np.array_equal(off[path], ref[path]), path
    assert losses_on[-1] < losses_on[0]


@pytest.mark.slow
def test_rewritten_step_on_cortex_m4_equals_the_host_bits(step, tmp_path):
    """train.elf under QEMU, its input read window by window from the batch file through
    the harness's model_read_input, runs the rewritten step to the host build's bits."""
    from gradrewrite.backends.mcu.firmware.build import toolchain_missing
    from gradrewrite.backends.mcu.training.compile import compile_train
    from gradrewrite.backends.mcu.training.run import run_training

    if toolchain_missing("cortex-m4"):
        pytest.skip("no arm-none-eabi-gcc / qemu-system-arm")
    x, y = batch()
    facts = compile_train(step.clone(), tmp_path / "mcu", target="cortex-m4", measure=False, patches="on")
    assert facts["patches"]["applied"] and not facts["memory_plan"]["input_in_arena"]
    host = run_training(tmp_path / "mcu", facts, x.numpy(), y.numpy(), 2, LR, target="host")
    m4 = run_training(tmp_path / "mcu", facts, x.numpy(), y.numpy(), 2, LR, target="cortex-m4")
    assert np.array_equal(host.losses, m4.losses)
    for p in host.params:
        assert np.array_equal(host.params[p], m4.params[p]), p


@pytest.mark.slow
def test_pooled_gradient_stored_for_a_weight_gradient_is_bit_exact(tmp_path):
    """A conv whose weight is trained needs its pooled, masked output gradient whole (its
    weight gradient reads it): the lazy broadcast is then stored as unfused, right before
    that reader, and the step stays bit for bit the reference's."""
    x, y = batch()
    step = int8_step(PatchNet(), x, y, "sparse-update(bias_last=3,weights='-1:1,-2:1')",
                     "qas(rounding=stochastic,seed=4)", lr=LR)
    steps = lower_step(step.clone()).program.steps
    assert not any("masked broadcast" in s.op for s in steps)
    pooled = 48 * 6 * 6 * 4   # pw's output gradient, f32 (96x96 input, four stride-2 convs)
    assert any(s.kernel == "gr_masked_grad_f32" and s.writes[0].nbytes == pooled for s in steps)
    facts, losses, got = _run(step, tmp_path / "mcu", "auto")
    ref_losses, ref = reference_steps(device_form(step), x.numpy(), y.numpy(), STEPS, LR, rounding="stochastic",
                                      seed=4)
    assert np.array_equal(losses, ref_losses)
    for path in ref:
        assert np.array_equal(got[path], ref[path]), path


# head weight and bias, the biases of the last seven convs, half of project's filters, a quarter of expand's
SPLIT_BLOCK = "sparse-update(bias_last=7,weights='-1:1,-5:1/2,-7:1/4')"


@pytest.mark.slow
def test_partially_trained_block_fused_is_bit_exact(unfused, tmp_path, monkeypatch):
    """An inverted residual block whose project and expand weights are partially trained
    (split: their first rows in SRAM) runs its backward in one step too, the expand's weight
    gradient reading only its trained channels of the expanded gradient, which the fused
    kernel copies out; the weight updates stay in place (same rounding draws). The pooled pw
    conv is made 16 of its 48 channels at a time. Bit for bit the step with every rewrite off
    (``chunked_pool`` / ``ir_bwd`` included) and the reference."""
    from gradrewrite.backends.mcu.training.lowering import int8 as s8

    monkeypatch.setattr(s8, "POOL_CHUNK_BYTES", 600)
    x, y = batch()
    step = int8_step(PatchNet(), x, y, SPLIT_BLOCK, "qas(rounding=stochastic,seed=4)", lr=LR)
    steps = lower_step(step.clone()).program.steps
    ir = [s for s in steps if s.kernel == "gr_ir_bwd_s8_f32"]
    assert [s.path for s in ir] == ["project"]
    assert "w_project_weight_q_frozen_rows, 8," in ir[0].code and "w_expand_weight_q_frozen_rows, 10," in ir[0].code
    g3 = [b for b in ir[0].writes if b.name.startswith("slice")]
    assert [b.nbytes for b in g3] == [10 * 12 * 12 * 4]                          # expand's 10 trained channels
    assert not any(s.path in ("dw1", "expand") and "convolution_backward" in s.op and "fused" not in s.op
                   for s in steps)
    assert sorted(s.path for s in steps if "fused update" in s.op) == ["expand", "head", "project"]
    pooled = [s for s in steps if "per chunk of output channels" in s.op]
    assert len(pooled) == 1 and "c0 < 48; c0 += 16)" in pooled[0].code
    assert [b.nbytes for b in pooled[0].writes if b.dtype == "i8"] == [16 * 36]   # pw's output: one chunk
    facts_on, losses_on, on = _run(step, tmp_path / "on", "auto")
    unfused()
    steps_off = lower_step(step.clone(), "off").program.steps
    assert not any(s.kernel == "gr_ir_bwd_s8_f32" or "per chunk" in s.op for s in steps_off)
    facts_off, losses_off, off = _run(step, tmp_path / "off", "off")
    assert facts_on["arena_bytes"] < facts_off["arena_bytes"]
    ref_losses, ref = reference_steps(device_form(step), x.numpy(), y.numpy(), STEPS, LR, rounding="stochastic",
                                      seed=4)
    assert np.array_equal(losses_on, losses_off) and np.array_equal(losses_on, ref_losses), (losses_on, ref_losses)
    assert set(on) == set(off) == set(ref)
    for path in ref:
        assert np.array_equal(on[path], ref[path]), path
        assert np.array_equal(off[path], ref[path]), path


def test_patch_modes(step):
    """``off`` leaves the step alone, a grid forces that grid, an unknown mode is refused."""
    tp = lower_train(step.clone())
    same, report = patch_step(tp, "off")
    assert same is tp and not report["applied"]
    forced, report = patch_step(lower_train(step.clone()), "2x2")
    assert report["applied"] and report["grid"] == [2, 2]
    assert forced.forward_steps > tp.forward_steps    # model_run runs the patched stage too
    with pytest.raises(ValueError, match="patches="):
        patch_step(lower_train(step.clone()), "sideways")


@pytest.mark.slow
def test_tte_like_mobilenet_arena_drops():
    """The benchmark's TTE-like step (MobileNetV2-w0.35, 128x128): the planned arena
    with the rewrites is at most half the arena without them (124 KB before)."""
    import warnings

    from benchmarks.mcu_train_budget import QAS, SCHEMES, build_step
    from gradrewrite.compiler import run_pipeline

    warnings.filterwarnings("ignore")
    g = build_step(128)[0].clone()
    run_pipeline(g, SCHEMES["tte-like"], verify=False)
    run_pipeline(g, QAS, verify=False)
    on = _arena(lower_step(g.clone()))
    with pytest.MonkeyPatch.context() as mp:
        for flag in REWRITES:
            mp.setattr(TrainLowerer, flag, False)
        off = _arena(lower_train(g.clone()))
    assert on <= 0.5 * off, (on, off)
