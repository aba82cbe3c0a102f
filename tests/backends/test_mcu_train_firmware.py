"""On-device training firmware (mcu backend): train.elf under QEMU and `gradrewrite run --train`.

A small conv net on scikit-learn's 8x8 digits, compiled as one SGD training step
with a sparse update (the linear head, the last two biases and half of the conv's
filters: a split SRAM/flash parameter). The firmware under QEMU (cortex-m4) and the
host build must both give the parameters torch's SGD gives, within fp32 rounding:
|C - torch| <= REL_TOL * max(1, max|p|) per parameter (observed about 1e-7 after 3
steps, 1e-6 after 30; a wrong gradient moves a parameter by lr * |grad|, orders
above). The Arm and host builds may differ by libm rounding (newlib vs glibc).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradrewrite.backends.mcu.training.run import run_training, whole_parameters
from tests.cli.conftest import assert_user_error, run_cli

ROOT = Path(__file__).resolve().parents[2]
BATCH = 16
LR = 0.5
SCHEME = "sparse-update(bias_last=2,weights='-1:1,-2:1/2')"
REL_TOL = 1e-5


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def digits_net():
    """The factory the CLI compiles (--module tests.backends.test_mcu_train_firmware:digits_net)."""
    torch.manual_seed(0)
    return DigitsNet().eval(), (torch.zeros(BATCH, 1, 8, 8),)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


def compile_digits(out: Path, target: str, *extra: str, train: bool = True, check: bool = True):
    args = ["compile", "--module", "tests.backends.test_mcu_train_firmware:digits_net", "--backend", "mcu",
            "--target", target, "-o", out, "-q", *extra]
    if train:
        args += ["--train", "--lr", str(LR)]
    return run_cli(*args, cwd=ROOT, check=check)


@pytest.fixture(scope="module")
def host_art(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "host"
    compile_digits(out, "host", "-p", SCHEME)
    return out


def facts_of(art: Path) -> dict:
    return json.loads((art / "mcu" / "model.json").read_text())


def torch_sgd(facts: dict, x: np.ndarray, y: np.ndarray, steps: int, lr: float):
    """torch's SGD on the parameters the artifact trains (rows past a split parameter's
    trained rows stay frozen), batches in order, cycling: (losses, whole parameters)."""
    model = digits_net()[0]
    params = dict(model.named_parameters())
    trained = {p["path"]: p.get("rows") for p in facts["trained"]}
    batches = len(x) // BATCH
    losses = []
    for i in range(steps):
        b = i % batches
        xb, yb = torch.from_numpy(x[b * BATCH:(b + 1) * BATCH]), torch.from_numpy(y[b * BATCH:(b + 1) * BATCH])
        loss = nn.functional.cross_entropy(model(xb), yb)
        grads = torch.autograd.grad(loss, [params[p] for p in trained])
        with torch.no_grad():
            for (path, rows), g in zip(trained.items(), grads):
                if rows is not None:
                    g[rows:] = 0
                params[path] -= lr * g
        losses.append(float(loss.detach()))
    return np.array(losses), {p: params[p].detach().numpy() for p in trained}


def assert_params_close(got: dict, want: dict, tol: float = REL_TOL):
    assert sorted(got) == sorted(want)
    for p, w in want.items():
        assert got[p].shape == w.shape and got[p].dtype == np.float32, p
        err = np.abs(got[p] - w).max()
        assert err <= tol * max(1.0, np.abs(w).max()), f"{p}: max |C - torch| = {err:.3g}"


def printed_losses(stdout: str, steps: int) -> np.ndarray:
    found = re.findall(r"^step (\d+)/(\d+) loss (\S+)$", stdout, flags=re.M)
    assert [(int(i), int(n)) for i, n, _ in found] == [(i + 1, steps) for i in range(steps)], stdout
    return np.array([float(v) for _, _, v in found])


@pytest.mark.slow
def test_qemu_training_firmware(tmp_path, digits):
    """compile --train --target cortex-m4 links train.elf within the budget and measures one
    step; `run --train` under QEMU gives the host build's and torch's parameters."""
    art = tmp_path / "m4"
    compile_digits(art, "cortex-m4", "-p", SCHEME)
    facts = facts_of(art)
    assert (art / "mcu" / "train.elf").is_file() and (art / "mcu" / "firmware.elf").is_file()
    fw, rt = facts["firmware"], facts["runtime"]
    assert fw["elf"] == "train.elf" and 0 < fw["sram_bytes"] <= fw["ram_budget_bytes"]
    assert 0 < fw["flash_bytes"] <= fw["flash_budget_bytes"]
    assert fw["inference_image"]["elf"] == "firmware.elf"
    assert 0 < rt["stack_step_bytes"] <= rt["stack_peak_bytes"] < rt["stack_reserve_bytes"]
    assert rt["instructions_per_step"] > 0 and "proxy" in rt["instructions_note"]
    per_symbol = rt["instructions_per_symbol"]
    assert per_symbol["gr_conv2d_bwd_weight_f32"] > 0 and per_symbol["gr_sgd_f32"] > 0
    layers = rt["instructions_per_layer"]
    assert layers["matched_all"] and sum(l["instructions"] for l in layers["layers"]) <= rt["instructions_per_step"]
    assert json.loads((art / "report.json").read_text())["mcu"]["runtime"] == rt

    steps, x, y = 3, *(a[:3 * BATCH] for a in digits)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    weights = tmp_path / "w.safetensors"
    proc = run_cli("run", art, "--train", tmp_path / "data.npz", "--steps", steps, "--lr", LR,
                   "--save-weights", weights, cwd=ROOT, check=True)
    assert "cortex-m4 firmware under QEMU" in proc.stdout
    from safetensors.numpy import load_file
    on_arm = load_file(weights)

    host = run_training(art / "mcu", facts, x, y, steps, LR, target="host")
    ref_losses, ref = torch_sgd(facts, x, y, steps, LR)
    assert_params_close(on_arm, ref)
    assert_params_close(whole_parameters(art / "mcu", facts, host.params), ref)
    np.testing.assert_allclose(printed_losses(proc.stdout, steps), ref_losses, rtol=1e-5)
    np.testing.assert_allclose(host.losses, ref_losses, rtol=1e-5)


@pytest.mark.slow
def test_run_train_cli_learns_digits(host_art, digits, tmp_path):
    """30 steps on the host build: the loss falls on a real task, the saved weights are the
    torch SGD result, whole, and the .pt file holds the same tensors."""
    x, y = digits
    data = tmp_path / "digits.npz"
    np.savez(data, x=x, y=y)
    steps = 30
    weights = tmp_path / "trained.safetensors"
    proc = run_cli("run", host_art, "--train", data, "--steps", steps, "--lr", LR, "--save-weights", weights,
                   cwd=ROOT, check=True)
    losses = printed_losses(proc.stdout, steps)
    assert losses[-7:].mean() < 0.75 * losses[:7].mean(), losses
    assert f"wrote {weights}" in proc.stdout and not list(tmp_path.glob(".*tmp"))

    from safetensors.numpy import load_file
    saved = load_file(weights)
    facts = facts_of(host_art)
    assert {k: list(v.shape) for k, v in saved.items()} == {p["path"]: p["shape"] for p in facts["trained"]}
    ref_losses, ref = torch_sgd(facts, x, y, steps, LR)
    assert_params_close(saved, ref, tol=1e-4)   # 30 steps of fp32 rounding
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)

    pt = tmp_path / "trained.pt"
    run_cli("run", host_art, "--train", data, "--steps", steps, "--lr", LR, "--save-weights", pt,
            cwd=ROOT, check=True)
    again = torch.load(pt, weights_only=True)
    assert sorted(again) == sorted(saved)
    for k, v in saved.items():
        np.testing.assert_array_equal(again[k].numpy(), v)


@pytest.mark.slow
def test_training_step_over_budget(tmp_path):
    """A full update under a tiny SRAM budget fails at link time with one line."""
    out = tmp_path / "m4"
    proc = compile_digits(out, "cortex-m4", "--ram-kb", "64", check=False)
    assert_user_error(proc, "the training step does not fit cortex-m4", "SRAM by", "budget 64 KB", "--ram-kb",
                      "sparse-update")
    assert not out.exists()


@pytest.mark.slow
def test_run_train_bad_inputs(host_art, digits, tmp_path):
    x, y = digits
    cases = {
        "no_y.npz": (dict(x=x[:32]), ["has no array 'y'"]),
        "shape.npz": (dict(x=np.zeros((32, 1, 9, 9), np.float32), y=y[:32]), ["samples of shape (1, 9, 9)",
                                                                            "(N, 1, 8, 8)"]),
        "few.npz": (dict(x=x[:5], y=y[:5]), ["holds 5 samples, fewer than one batch of 16"]),
        "labels.npz": (dict(x=x[:32], y=np.full(32, 10)), ["labels 10..10", "0..9"]),
    }
    weights = tmp_path / "w.safetensors"
    for name, (arrays, needles) in cases.items():
        np.savez(tmp_path / name, **arrays)
        proc = run_cli("run", host_art, "--train", tmp_path / name, "--steps", 2, "--save-weights", weights,
                       cwd=ROOT)
        assert_user_error(proc, *needles)
    np.savez(tmp_path / "ok.npz", x=x[:32], y=y[:32])
    assert_user_error(run_cli("run", host_art, "--train", tmp_path / "ok.npz", "--save-weights",
                              tmp_path / "w.npz", cwd=ROOT), "must end in .safetensors or .pt")
    assert not weights.exists() and not (tmp_path / "w.npz").exists()

    inference = tmp_path / "infer"
    compile_digits(inference, "host", train=False)
    assert_user_error(run_cli("run", inference, "--train", tmp_path / "ok.npz", cwd=ROOT),
                      "not an mcu training-step artifact", "--train --backend mcu")


def test_whole_parameters_int8_scale(tmp_path):
    """Integer-stored trained parameters come back as torch values: trained rows, then the
    flash rows, times the per-row to_param_scale."""
    facts = {"trained": [
        {"path": "fc.weight", "shape": [3, 2], "rows": 2, "dtype": "int8", "bytes": 4,
         "to_param_scale": [0.5, 0.25, 2.0]},
        {"path": "fc.bias", "shape": [3], "rows": None, "dtype": "float32", "bytes": 12}]}
    (tmp_path / "train").mkdir()
    np.savez(tmp_path / "train" / "frozen_rows.npz", **{"fc.weight": np.array([7, -8], np.int8)})
    got = whole_parameters(tmp_path, facts, {"fc.weight": np.array([[2, -4], [8, 1]], np.int8),
                                             "fc.bias": np.array([1.5, 0, -1], np.float32)})
    np.testing.assert_array_equal(got["fc.weight"], np.array([[1, -2], [2, 0.25], [14, -16]], np.float32))
    np.testing.assert_array_equal(got["fc.bias"], np.array([1.5, 0, -1], np.float32))
    assert all(v.dtype == np.float32 for v in got.values())
