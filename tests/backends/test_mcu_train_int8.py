"""int8 on-device training step (mcu backend): generated C vs the integer reference.

A model is quantized (static int8), made trainable (``passes.qas.trainable_int8``),
captured as one training step, pruned by sparse-update and scaled by qas. The C step
keeps int8 weights, int32 biases and int8 activations, computes fp32 gradients and
applies integer updates (QAS factor, rounding, saturation). ``train_reference`` is the
specification of that computation; after several steps every trained parameter must
equal it bit for bit, and so must every loss. Against the torch step (which keeps the
update unrounded and computes fake-quantized floats) the device's parameter change must
point the same way: cosine > 0.8 (observed 0.90-1.0: the device's relu/relu6 masks come
from int8 outputs, its layers requantize in integers; a wrong gradient gives ~0 or less).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from examples.models import small_cnn
from gradrewrite.backends.mcu.inference.lowering import Unsupported
from gradrewrite.backends.mcu.training.device_form import device_form
from gradrewrite.backends.mcu.training.host import build_train_host, run_train_host, write_train
from gradrewrite.backends.mcu.training.reference import gr_expf, gr_logf, reference_steps
from gradrewrite.compiler import run_pipeline
from gradrewrite.passes.qas import trainable_int8
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.registry import PassContext
from gradrewrite.rewrite.train_step import capture_train_step

LR = 0.05
STEPS = 3


class MobileBlock(torch.nn.Module):
    """Depthwise (stride 2) and grouped convs, relu6, a residual add, average pooling
    and a two-layer head: what the int8 backward must carry gradients through."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.grp = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.hidden = nn.Linear(12, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.stem(x))
        x = torch.nn.functional.relu6(self.dw(x))
        x = x + self.pw(x)
        x = torch.relu(self.grp(x))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(torch.relu(self.hidden(x)))


def int8_step(model, x, y, scheme, qas="qas", lr=LR):
    torch.manual_seed(0)
    g = capture(model.eval(), (x,))
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        run_pipeline(g, "fold-bn", verify=False)
    gen = torch.Generator().manual_seed(5)
    calib = [(torch.randn(x.shape, generator=gen),) for _ in range(4)]
    # every output quantized, as prepare() asks for an SGD step (training.int8_step_chains)
    run_pipeline(g, "quantize(mode=static,outputs=all)", verify=False, ctx=PassContext(calibration=calib))
    step = capture_train_step(trainable_int8(g), "cross_entropy", (x, y), lr=lr)
    run_pipeline(step, scheme, verify=False)
    run_pipeline(step, qas, verify=False)
    return step


def mobile_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 12, 12, generator=g), torch.tensor([0, 4])


def cnn_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([1, 3, 5, 7])


CASES = {
    # small_cnn: the head and half of the last conv's filters (max pooling stops the backward)
    "cnn_partial": (lambda: small_cnn()[0], cnn_batch, "sparse-update(bias_last=2,weights='-1:1,-2:1/2')",
                    "qas"),
    # input gradients through int8 pointwise / depthwise / grouped weights, partial depthwise
    "mobile_deep": (MobileBlock, mobile_batch, "sparse-update(bias_last=4,weights='-1:1,-2:1/2,grp:1,dw:1/2')",
                    "qas"),
    "mobile_stochastic": (MobileBlock, mobile_batch, "sparse-update(bias_last=3,weights='-1:1,pw:1/4')",
                          "qas(rounding=stochastic,seed=3)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_int8_step_is_bit_exact(case, tmp_path):
    make, data, scheme, qas = CASES[case]
    x, y = data()
    step = int8_step(make(), x, y, scheme, qas)
    facts = write_train(step.clone(), tmp_path / "mcu")
    assert facts["int8"] and {p["dtype"] for p in facts["trained"]} <= {"int8", "int32"}
    build_train_host(tmp_path / "mcu")
    losses, got = run_train_host(tmp_path / "mcu", x.numpy(), y.numpy(), STEPS, LR)
    qas_opts = step.meta["train_step"]["qas"]
    ref_losses, ref = reference_steps(device_form(step), x.numpy(), y.numpy(), STEPS, LR,
                                      rounding=qas_opts["rounding"], seed=qas_opts["seed"])
    assert np.array_equal(losses, ref_losses), (losses, ref_losses)
    assert set(got) == set(ref)
    for path, value in got.items():
        assert value.dtype == ref[path].dtype
        diff = int(np.count_nonzero(value != ref[path]))
        assert diff == 0, f"{path}: {diff} of {value.size} values differ from the integer reference"
    assert losses[-1] < losses[0]


def test_int8_update_follows_the_torch_step(tmp_path):
    """One step: the device's parameter change against the (unrounded, fake-quant) torch
    step's, at a learning rate where updates span several int8 steps (smaller ones round
    to nothing under nearest rounding: that is what stochastic rounding is for)."""
    x, y = mobile_batch()
    lr = 2.0
    step = int8_step(MobileBlock(), x, y, "sparse-update(bias_last=4,weights='-1:1,-2:1,grp:1')", lr=lr)
    facts = write_train(step.clone(), tmp_path / "mcu")
    build_train_host(tmp_path / "mcu")
    loss, got = run_train_host(tmp_path / "mcu", x.numpy(), y.numpy(), 1, lr)
    outs = dict(zip(step.meta["train_step"]["outputs"], step(x, y)))
    assert abs(float(loss[0]) - float(outs[step.meta["train_step"]["loss"]])) < 0.05
    for p in facts["trained"]:
        attr = step.meta["train_step"]["params"][p["path"]]["attr"]
        before = step.attr(attr).detach().double().numpy()
        scale = np.asarray(p.get("to_param_scale", np.ones(before.shape[0]))).reshape(-1, *[1] * (before.ndim - 1))
        dev = got[p["path"]].astype(np.float64) * scale - before
        ref = outs[p["path"]].detach().double().numpy() - before
        cos = (dev * ref).sum() / (np.linalg.norm(dev) * np.linalg.norm(ref) + 1e-30)
        assert cos > 0.8, f"{p['path']}: cosine {cos:.3f} between device and torch updates"


def test_expf_logf_mirror_are_accurate():
    x = np.linspace(-80, 80, 20001, dtype=np.float32)
    assert np.max(np.abs(gr_expf(x) / np.exp(x.astype(np.float64)) - 1)) < 1e-6
    v = np.exp(np.linspace(-20, 20, 20001)).astype(np.float32)
    assert np.max(np.abs(gr_logf(v) - np.log(v.astype(np.float64)))) < 2e-6


@pytest.mark.slow
def test_backward_through_int8_max_pooling_is_refused(tmp_path):
    x, y = cnn_batch()
    step = int8_step(small_cnn()[0], x, y, "sparse-update(bias_last=5,weights='-1:1,-3:1')")
    with pytest.raises(Unsupported, match="max pooling"):
        write_train(step, tmp_path / "mcu")


@pytest.mark.slow
def test_cli_int8_training_on_digits(tmp_path):
    """`compile --train` with quantize + qas through the CLI (calibrated on --calib), then
    `run --train` on scikit-learn digits: the int8 classifier head learns (the mean loss of
    the last 10 of 40 steps is below the first 10's); the report carries the bit-exact
    check against the integer reference."""
    import json
    from pathlib import Path

    from sklearn.datasets import load_digits

    from tests.cli.conftest import run_cli

    root = Path(__file__).resolve().parents[2]
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    np.savez(tmp_path / "calib.npz", x=x[1000:1064])
    np.savez(tmp_path / "data.npz", x=x[:640], y=d.target[:640].astype(np.int64))
    out = tmp_path / "art"
    run_cli("compile", "--module", "tests.backends.test_mcu_train_firmware:digits_net", "--train", "--lr", "0.5",
            "--calib", tmp_path / "calib.npz", "-p",
            "quantize(mode=static),sparse-update(bias_last=1,weights='-1:1'),qas(rounding=stochastic,seed=2)",
            "--backend", "mcu", "--target", "host", "-o", out, "-q", cwd=root, check=True)
    facts = json.loads((out / "mcu" / "model.json").read_text())
    assert facts["int8"] and facts["int8_check"]["bit_exact"] and facts["input"]["dtype"] == "int8"
    assert {p["dtype"] for p in facts["trained"]} == {"int8", "int32"}
    proc = run_cli("run", out, "--train", tmp_path / "data.npz", "--steps", "40",
                   "--save-weights", tmp_path / "w.safetensors", cwd=root, check=True)
    import re
    losses = np.array([float(v) for v in re.findall(r"^step \d+/40 loss (\S+)$", proc.stdout, flags=re.M)])
    assert len(losses) == 40 and losses[-10:].mean() < losses[:10].mean() - 0.05, losses
    from safetensors.numpy import load_file
    w = load_file(tmp_path / "w.safetensors")
    assert w["fc.weight_q"].shape == (10, 128) and np.array_equal(w["fc.weight_q"], np.round(w["fc.weight_q"]))


class ExpandNet(torch.nn.Module):
    """Two pointwise expand + depthwise 3x3 pairs (MobileNetV2's inverted residual): the
    first frozen, the second's depthwise bias trained (the earliest trained layer)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pw1 = nn.Conv2d(8, 24, 1)
        self.dw1 = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.proj = nn.Conv2d(24, 8, 1)
        self.pw2 = nn.Conv2d(8, 20, 1)
        self.dw2 = nn.Conv2d(20, 20, 3, stride=2, padding=1, groups=20)
        self.head = nn.Linear(20, 5)

    def forward(self, x):
        r6 = torch.nn.functional.relu6
        x = r6(self.stem(x))
        x = x + self.proj(r6(self.dw1(r6(self.pw1(x)))))
        x = r6(self.dw2(self.pw2(x)))
        return self.head(x.mean((2, 3)))


EXPAND_SCHEME = "sparse-update(bias_last=2,weights='-1:1')"   # dw2.bias, head.weight, head.bias


def expand_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 10, 10, generator=g), torch.tensor([0, 4])


def test_int8_step_streams_expand_depthwise_pairs():
    """A training step streams pointwise expand + depthwise pairs (gr_pw_dw_s8) as
    inference does: a frozen pair with the constants folded at code generation, a pair
    whose depthwise bias the step updates with its base made at run time (gr_base_s8 from
    the SRAM bias); no expanded tensor is stored, so the arena is smaller than unstreamed.
    (Refusing every pair with a run-time buffer sent a whole MobileNetV2 training step back
    to one kernel per layer: 240 KB of arena instead of 124.)"""
    from gradrewrite.backends.mcu.inference.codegen import plan_arena
    from gradrewrite.backends.mcu.training.lowering import lower_train
    from gradrewrite.backends.mcu.training.lowering.lowerer import TrainLowerer

    x, y = expand_batch()
    step = int8_step(ExpandNet(), x, y, EXPAND_SCHEME)
    tp = lower_train(step.clone())
    fwd = tp.program.steps[:tp.forward_steps]
    by_path = {st.path: st for st in fwd if st.kernel.startswith(("gr_pw", "gr_point", "gr_depth", "gr_conv"))}
    assert by_path["dw1"].kernel == by_path["dw2"].kernel == "gr_pw_dw_s8"
    assert not {"pw1", "pw2"} & {st.path for st in fwd}, "an expand conv ran on its own"
    assert "run-time bases" not in by_path["dw1"].op and "gr_base_s8" not in by_path["dw1"].code
    bias = next(b for b in tp.trained if b.path == "dw2.bias")
    assert "run-time bases" in by_path["dw2"].op and f"gr_base_s8({bias.name}, " in by_path["dw2"].code
    assert by_path["proj"].kernel == "gr_pointwise_s8"   # frozen layers take the inference kernels

    def arena(stream: bool) -> tuple[int, Counter]:
        """(arena bytes, sizes of the int8 arena buffers)"""
        lw = TrainLowerer(step.clone())
        lw.stream = stream
        prog = lw.run()
        prog.consts = [*lw.trained.values(), *prog.consts]
        return (plan_arena(prog, inputs=[prog.inputs[0].buf]).plan.arena_bytes,
                Counter(b.nbytes for b in prog.arena if b.dtype == "i8"))

    (streamed, sizes), (unstreamed, sizes_unstreamed) = arena(True), arena(False)
    expanded = {2 * 24 * 10 * 10: 1, 2 * 20 * 10 * 10: 1}   # pw1's and pw2's int8 outputs (batch 2)
    assert sizes_unstreamed - sizes >= Counter(expanded), (sizes_unstreamed, sizes)
    assert streamed < unstreamed, (streamed, unstreamed)


def test_int8_step_with_streamed_trained_bias_is_bit_exact(tmp_path):
    """The streamed pairs of ``test_int8_step_streams_expand_depthwise_pairs`` (the run-time
    base re-made from the updated bias every step) equal the integer reference bit for bit."""
    x, y = expand_batch()
    step = int8_step(ExpandNet(), x, y, EXPAND_SCHEME, "qas(rounding=stochastic,seed=3)")
    facts = write_train(step.clone(), tmp_path / "mcu")
    assert [o["kernel"] for o in facts["ops"]].count("gr_pw_dw_s8") == 2
    build_train_host(tmp_path / "mcu")
    losses, got = run_train_host(tmp_path / "mcu", x.numpy(), y.numpy(), STEPS, LR)
    ref_losses, ref = reference_steps(device_form(step), x.numpy(), y.numpy(), STEPS, LR,
                                      rounding="stochastic", seed=3)
    assert np.array_equal(losses, ref_losses), (losses, ref_losses)
    assert not np.array_equal(got["dw2.bias"], step.attr(step.meta["train_step"]["params"]["dw2.bias"]["attr"])
                              .detach().numpy())   # the bias the base is made from did change
    for path, value in got.items():
        assert np.array_equal(value, ref[path]), path
    assert losses[-1] < losses[0]


def test_check_mode_placeholders_keep_tuple_items():
    """In check mode an op the lowering cannot take gets placeholder buffers; a tuple's
    None items (a convolution backward's gradients not wanted) stay where they are, so
    getitem takes the right one (they were dropped: check --train on an int8 SE net
    stopped on 'internal error: IndexError')."""
    from gradrewrite.backends.mcu.inference.lowering.lowerer import Lowerer

    lw = Lowerer(capture(torch.nn.Linear(2, 2).eval(), (torch.zeros(1, 2),)), collect=True)
    node = type("Node", (), {"meta": {"val": (torch.zeros(2, 3), None, torch.zeros(4, dtype=torch.int8))}})()
    gx, gw, gb = lw._placeholder_for(node)
    assert gw is None and gx.shape == (2, 3) and (gb.shape, gb.dtype) == ((4,), "i8")


class GeluNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = torch.nn.functional.gelu(self.conv(x))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def test_ops_without_an_integer_reference_are_refused(tmp_path):
    x, y = mobile_batch()
    step = int8_step(GeluNet(), x, y, "sparse-update(bias_last=2,weights='-1:1')")
    with pytest.raises(Unsupported, match="gelu at <root>|gelu"):
        write_train(step, tmp_path / "mcu")


def test_sgd_step_quantizes_every_layer_output():
    """Before an SGD step, quantize(mode=static) keeps every output pair (outputs=all): the
    int8 step requantizes every conv/linear. An explicit outputs and weight-only stay."""
    from gradrewrite.rewrite.pipeline import parse_pipeline
    from gradrewrite.training import int8_step_chains

    specs = parse_pipeline("fold-bn,quantize(mode=static),quantize(outputs=auto),"
                           "quantize(mode=weight-only,bits=4)")
    assert [int8_step_chains(s).text() for s in specs] == [
        "fold-bn", "quantize(mode=static, outputs=all)", "quantize(outputs=auto)",
        "quantize(mode=weight-only, bits=4)"]


def test_int8_step_on_cortex_m4_equals_the_host_bits(tmp_path):
    """train.elf under QEMU (arm-none-eabi-gcc, hard-float Cortex-M4) and the host build
    (x86 cc) run the same int8 steps to the same bits: no FMA contraction, no libm."""
    from gradrewrite.backends.mcu.training.compile import compile_train
    from gradrewrite.backends.mcu.training.run import run_training

    x, y = mobile_batch()
    step = int8_step(MobileBlock(), x, y, "sparse-update(bias_last=4,weights='-1:1,-2:1/2,grp:1,dw:1/2')",
                     "qas(rounding=stochastic,seed=3)")
    facts = compile_train(step, tmp_path / "mcu", target="cortex-m4", measure=False)
    host = run_training(tmp_path / "mcu", facts, x.numpy(), y.numpy(), 3, LR, target="host")
    m4 = run_training(tmp_path / "mcu", facts, x.numpy(), y.numpy(), 3, LR, target="cortex-m4")
    assert np.array_equal(host.losses, m4.losses)
    for p in host.params:
        assert np.array_equal(host.params[p], m4.params[p]), p


def _v3_case():
    from tests.backends.test_mcu_train_cnns import MCUNetLike, colour_task

    torch.manual_seed(0)
    x, y = colour_task(2, seed=3)
    return MCUNetLike(se="mixed"), torch.from_numpy(x), torch.from_numpy(y), \
        "sparse-update(bias_last=12,weights='-1:1,-3:1')"


@pytest.mark.parametrize("case", ["streamed trained bias", "hardswish and SE gates"])
def test_int8_step_kernels_on_cortex_m4_equal_the_host_bits(case, tmp_path):
    """The run-time base of a streamed pair (gr_base_s8) and the gate / hardswish
    kernels (gr_sigmoid_tr_f32 with gr_expf, gr_where_cmp_f32) give the same bits under
    QEMU (Cortex-M4, hard float) as on the host, over 3 steps."""
    from gradrewrite.backends.mcu.training.compile import compile_train
    from gradrewrite.backends.mcu.training.run import run_training

    if case == "streamed trained bias":
        (x, y), model, scheme = expand_batch(), ExpandNet(), EXPAND_SCHEME
    else:
        model, x, y, scheme = _v3_case()
    step = int8_step(model, x, y, scheme, "qas(rounding=stochastic,seed=3)")
    facts = compile_train(step, tmp_path / "mcu", target="cortex-m4", measure=False)
    kernels = {op["kernel"] for op in facts["ops"]}
    assert ("gr_pw_dw_s8" if case == "streamed trained bias" else "gr_where_cmp_f32") in kernels
    host = run_training(tmp_path / "mcu", facts, x.numpy(), y.numpy(), 3, LR, target="host")
    m4 = run_training(tmp_path / "mcu", facts, x.numpy(), y.numpy(), 3, LR, target="cortex-m4")
    assert np.array_equal(host.losses, m4.losses)
    for p in host.params:
        assert np.array_equal(host.params[p], m4.params[p]), p
